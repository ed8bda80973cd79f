"""MST-KDNet: a residual 3-D U-Net with a transformer bottleneck, style and content branches.

One class serves teacher and student (two instances, no shared weights). For an input
``B x 4 x H x W x D`` (H, W, D divisible by 32) and base width ``c``:

=================  =================================================  ===================
stage              operation                                          output
=================  =================================================  ===================
c1                 Conv3(4->c), ResBlock                              c @ 1
c2                 Conv3 s2 (c->2c), ResBlock x2                      2c @ 1/2
c2d, c3            Conv3 s2 (2c->4c); ResBlock x2                     4c @ 1/4
c3d  (f_enc)       Conv3 s2 (4c->8c)                                  8c @ 1/8
ViT                patch p=4 on c3d, L blocks, 4 taps                 N = HWD/32^3 tokens
UNETR decoder      taps -> z3', z6', z9', z12' -> output (+ c3d)      8c @ 1/8
content (f_dec)    ResBlock x4 on output                              8c @ 1/8
style   (f_t)      1x1 Conv on [maxpool(c2d), c3d, output]            8c @ 1/8
fuse               1x1 Conv on [style, content], dropout              8c @ 1/8
decoder            1x1 Conv, nearest x2, + skip, ResBlock (x3)        c @ 1
head               1x1 Conv(c->4)                                     4 @ 1 (NETC, ED, ET, BG logits)
=================  =================================================  ===================

ResBlock is the pre-activation residual block ``x + Conv(ReLU(GN(Conv(ReLU(GN(x))))))``
(``monai.networks.blocks.ResBlock``). The UNETR-style decoder uses ``decoder_norm``:
instance normalisation by default, which at batch size 1 equals the official code's
train-mode BatchNorm and, unlike BatchNorm, has no running statistics to average across
sites; ``batch`` restores the official layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.blocks.segresnet_block import ResBlock
from omegaconf import DictConfig
from torch import nn

from mstkd.data.labels import CLASSES
from mstkd.model.conv import use_fast_cpu_convolutions
from mstkd.model.vit import BottleneckViT

STRIDE = 32
"""Total downsampling of the network: 1/8 by the CNN encoder, then patches of 4 in the ViT."""


@dataclass
class NetOutput:
    """Everything one forward pass returns (shapes for input ``B x 4 x H x W x D``)."""

    logits: torch.Tensor  # B x 4 x H x W x D, class logits NETC, ED, ET, BG
    style: torch.Tensor  # B x 8c x H/8 x W/8 x D/8
    content: torch.Tensor  # B x 8c x H/8 x W/8 x D/8
    global_style: list[torch.Tensor]  # [f_enc = c3d, f_t = style, f_dec = content]
    transformer_features: list[torch.Tensor]  # [z3', z6', z9', z12'] multi-scale decoder features
    attention: list[torch.Tensor]  # 4 x (B x heads x N x N)


def _norm(kind: str, groups: int = 8) -> tuple:
    return {
        "instance": ("instance", {"affine": True}),
        "batch": ("batch", {}),
        "group": ("group", {"num_groups": groups}),
    }[kind]


def _conv(cin: int, cout: int, norm: tuple, stride: int = 1) -> Convolution:
    """Conv3 -> Norm -> ReLU."""
    return Convolution(3, cin, cout, strides=stride, kernel_size=3, norm=norm, act="relu", adn_ordering="NA")


def _up(cin: int, cout: int) -> nn.ConvTranspose3d:
    """Transposed conv, kernel 2, stride 2 (no norm, no activation)."""
    return nn.ConvTranspose3d(cin, cout, kernel_size=2, stride=2)


def _deconv(cin: int, cout: int, norm: tuple) -> nn.Sequential:
    """Transposed conv x2 upsampling, then Conv3 -> Norm -> ReLU."""
    return nn.Sequential(_up(cin, cout), _conv(cout, cout, norm))


class TransformerDecoder(nn.Module):
    """UNETR-style decoder of four tapped hidden states into multi-scale features.

    With decoder widths ``(d1, d2, d3, d4)`` and tokens at 1/32:
    z12' = Up(z12) (d1 @ 1/16); z9' = Up(Conv3x3([Deconv(z9), z12'])) (d2 @ 1/8);
    z6' = Up(Conv2x([Deconv2(z6), z9'])) (d3 @ 1/4); z3' = Up(Conv s2, Conv s2 ([Deconv3(z3), z6'])) (d4 @ 1/8);
    output = 1x1 Conv(Conv2x([Conv2(c3d), z3'])) (8c @ 1/8).
    """

    def __init__(self, hidden: int, widths: list[int], enc_channels: int, norm: tuple) -> None:
        super().__init__()
        d1, d2, d3, d4 = widths
        self.up12 = _up(hidden, d1)
        self.dec9 = _deconv(hidden, d1, norm)
        self.up9 = nn.Sequential(_conv(2 * d1, d1, norm), _conv(d1, d1, norm), _conv(d1, d1, norm), _up(d1, d2))
        self.dec6 = nn.Sequential(_deconv(hidden, d1, norm), _deconv(d1, d2, norm))
        self.up6 = nn.Sequential(_conv(2 * d2, d2, norm), _conv(d2, d2, norm), _up(d2, d3))
        self.dec3 = nn.Sequential(_deconv(hidden, d1, norm), _deconv(d1, d2, norm), _deconv(d2, d3, norm))
        self.up3 = nn.Sequential(_conv(2 * d3, d3, norm, stride=2), _conv(d3, d3, norm, stride=2), _up(d3, d4))
        self.dec0 = nn.Sequential(_conv(enc_channels, d4 // 2, norm), _conv(d4 // 2, d4, norm))
        self.head = nn.Sequential(_conv(2 * d4, d4, norm), _conv(d4, d4, norm), nn.Conv3d(d4, enc_channels, 1))

    def forward(self, taps: list[torch.Tensor], grid: tuple[int, int, int], enc: torch.Tensor):
        z3, z6, z9, z12 = (t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid) for t in taps)
        f12 = self.up12(z12)
        f9 = self.up9(torch.cat([self.dec9(z9), f12], 1))
        f6 = self.up6(torch.cat([self.dec6(z6), f9], 1))
        f3 = self.up3(torch.cat([self.dec3(z3), f6], 1))
        out = self.head(torch.cat([self.dec0(enc), f3], 1))
        return out, [f3, f6, f9, f12]


class _UpStage(nn.Module):
    """1x1 Conv to the skip's width, nearest x2, add the skip, ResBlock."""

    def __init__(self, cin: int, cout: int, norm: tuple) -> None:
        super().__init__()
        self.reduce = nn.Conv3d(cin, cout, 1)
        self.block = ResBlock(3, cout, norm=norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(F.interpolate(self.reduce(x), scale_factor=2, mode="nearest") + skip)


class MSTKDNet(nn.Module):
    """One MST-KDNet network (teacher or student). See the module docstring for the stages."""

    def __init__(self, cfg: DictConfig, in_channels: int = 4, out_channels: int = len(CLASSES)) -> None:
        super().__init__()
        c = int(cfg.base_channels)
        gn = _norm("group", int(cfg.norm_groups))
        v = cfg.vit
        grid = tuple(int(s) // STRIDE for s in cfg.input_size)
        if int(v.patch) * 8 != STRIDE:
            raise ValueError("the decoder is built for ViT patches of 4 on the 1/8 feature map")
        self.c1 = nn.Sequential(nn.Conv3d(in_channels, c, 3, padding=1), ResBlock(3, c, norm=gn))
        self.c2 = nn.Sequential(
            nn.Conv3d(c, 2 * c, 3, stride=2, padding=1), ResBlock(3, 2 * c, norm=gn), ResBlock(3, 2 * c, norm=gn)
        )
        self.c2d = nn.Conv3d(2 * c, 4 * c, 3, stride=2, padding=1)
        self.c3 = nn.Sequential(ResBlock(3, 4 * c, norm=gn), ResBlock(3, 4 * c, norm=gn))
        self.c3d = nn.Conv3d(4 * c, 8 * c, 3, stride=2, padding=1)
        self.vit = BottleneckViT(
            8 * c,
            int(v.hidden),
            int(v.layers),
            int(v.heads),
            int(v.mlp),
            int(v.patch),
            float(v.dropout),
            int(v.taps),
            grid,
        )
        self.transformer_decoder = TransformerDecoder(
            int(v.hidden), list(cfg.decoder_channels), 8 * c, _norm(str(cfg.decoder_norm), int(cfg.norm_groups))
        )
        self.content = nn.Sequential(*[ResBlock(3, 8 * c, norm=gn) for _ in range(4)])
        self.style = nn.Conv3d(4 * c + 8 * c + 8 * c, 8 * c, 1)
        self.fuse = nn.Sequential(nn.Conv3d(16 * c, 8 * c, 1), nn.Dropout(float(cfg.fuse_dropout)))
        self.up3 = _UpStage(8 * c, 4 * c, gn)
        self.up2 = _UpStage(4 * c, 2 * c, gn)
        self.up1 = _UpStage(2 * c, c, gn)
        self.head = nn.Conv3d(c, out_channels, 1)
        use_fast_cpu_convolutions(self)

    def forward(self, x: torch.Tensor) -> NetOutput:
        """``x``: ``B x 4 x H x W x D`` with H, W, D divisible by 32 (see :data:`STRIDE`)."""
        if any(s % STRIDE for s in x.shape[2:]):
            raise ValueError(f"input size {tuple(x.shape[2:])} is not divisible by {STRIDE}")
        c1 = self.c1(x)
        c2 = self.c2(c1)
        c2d = self.c2d(c2)
        c3 = self.c3(c2d)
        c3d = self.c3d(c3)
        taps, attention, grid = self.vit(c3d)
        output, features = self.transformer_decoder(taps, grid, c3d)
        output = output + c3d
        content = self.content(output)
        style = self.style(torch.cat([F.max_pool3d(c2d, 2), c3d, output], 1))
        y = self.fuse(torch.cat([style, content], 1))
        y = self.up1(self.up2(self.up3(y, c3), c2), c1)
        return NetOutput(self.head(y), style, content, [c3d, style, content], features, attention)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits only (for sliding-window inference): ``B x 4 x H x W x D -> B x 4 x H x W x D``."""
        return self.forward(x).logits


class StyleDiscriminator(nn.Module):
    """Tells teacher style features (label 0) from student ones (label 1): one logit per sample.

    ``Conv(k4, s2, p1) -> LeakyReLU(0.2)`` per width in ``channels``, then a 1x1x1 Conv to one
    channel averaged over space (the official code ends in a fixed 2x3x2 kernel, which ties it
    to one input size). Input ``B x 8c x h x w x d`` -> output ``B``.
    """

    def __init__(self, in_channels: int, channels: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width in channels:
            layers += [nn.Conv3d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            in_channels = width
        layers.append(nn.Conv3d(in_channels, 1, 1))
        self.net = use_fast_cpu_convolutions(nn.Sequential(*layers))

    def forward(self, style: torch.Tensor) -> torch.Tensor:
        return self.net(style).mean(dim=(1, 2, 3, 4))


def build_discriminator(cfg: DictConfig) -> StyleDiscriminator:
    """The style discriminator for a model preset (``cfg`` = the ``model`` section)."""
    return StyleDiscriminator(8 * int(cfg.base_channels), list(cfg.discriminator_channels))


def build_networks(cfg: DictConfig) -> tuple[MSTKDNet, MSTKDNet, StyleDiscriminator]:
    """Teacher, student and style discriminator for a model preset (``cfg`` = the ``model`` section)."""
    return MSTKDNet(cfg), MSTKDNet(cfg), build_discriminator(cfg)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
