"""The network: shapes at several input sizes, parameter counts per preset, the paper preset's forward pass."""

from __future__ import annotations

import pytest
import torch

from mstkd.config import load_config
from mstkd.model import STRIDE, MSTKDNet, build_networks, count_parameters

PAPER_PARAMETERS = 154_335_684  # one network of the official code at init_channels=16


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(["model=tiny"]).model
    torch.manual_seed(0)
    return cfg, MSTKDNet(cfg).eval()


@pytest.mark.parametrize("size", [(32, 32, 32), (64, 32, 96), (96, 64, 64)])
def test_shapes_at_several_input_sizes(tiny, size):
    cfg, net = tiny
    c = cfg.base_channels
    with torch.no_grad():
        out = net(torch.randn(1, 4, *size))
    s8 = tuple(v // 8 for v in size)
    tokens = (size[0] // STRIDE) * (size[1] // STRIDE) * (size[2] // STRIDE)
    assert out.logits.shape == (1, 4, *size)
    assert out.style.shape == out.content.shape == (1, 8 * c, *s8)
    assert [tuple(f.shape) for f in out.global_style] == [(1, 8 * c, *s8)] * 3
    d1, d2, d3, d4 = cfg.decoder_channels
    assert [tuple(f.shape[1:]) for f in out.transformer_features] == [
        (d4, *s8),
        (d3, *(v // 4 for v in size)),
        (d2, *s8),
        (d1, *(v // 16 for v in size)),
    ]
    assert len(out.attention) == 4
    assert all(a.shape == (1, cfg.vit.heads, tokens, tokens) for a in out.attention)
    assert torch.allclose(out.attention[0].sum(-1), torch.ones(1))


def test_input_not_divisible_by_stride_is_refused(tiny):
    with pytest.raises(ValueError, match="divisible"):
        tiny[1](torch.randn(1, 4, 40, 32, 32))


def test_parameter_counts_per_preset():
    counts = {}
    for preset in ("tiny", "lite", "paper"):
        teacher, student, disc = build_networks(load_config([f"model={preset}"]).model)
        assert count_parameters(teacher) == count_parameters(student)
        counts[preset] = count_parameters(teacher)
    assert abs(counts["paper"] - PAPER_PARAMETERS) / PAPER_PARAMETERS < 0.05
    assert counts["tiny"] < counts["lite"] < counts["paper"] / 10


def test_decoder_norm_choice():
    cfg = load_config(["model=tiny", "model.decoder_norm=batch"]).model
    net = MSTKDNet(cfg)
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in MSTKDNet(load_config(["model=tiny"]).model).modules())


@pytest.mark.slow
def test_paper_preset_forward_pass():
    cfg = load_config(["model=paper"]).model
    net = MSTKDNet(cfg).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 4, *cfg.input_size))
    assert out.logits.shape == (1, 4, 160, 192, 128)
    assert out.attention[0].shape == (1, 12, 120, 120)
    assert [tuple(f.shape[1:]) for f in out.transformer_features] == [
        (64, 20, 24, 16),
        (128, 40, 48, 32),
        (256, 20, 24, 16),
        (512, 10, 12, 8),
    ]


@pytest.mark.parametrize(
    "channels,out,size,stride,layout",
    [  # 12 output channels: the zero-sample backward; 16 or more in and out: the oneDNN-layout one
        (16, 12, 16, 1, torch.contiguous_format),
        (8, 12, 16, 2, torch.contiguous_format),
        (4, 12, 24, 1, torch.contiguous_format),
        (16, 16, 16, 1, torch.contiguous_format),
        (16, 32, 16, 2, torch.channels_last_3d),
        (32, 16, 8, 1, torch.channels_last_3d),
    ],
)
def test_fast_cpu_convolution_matches_native(channels, out, size, stride, layout):
    from mstkd.model.conv import Conv3d, use_fast_cpu_convolutions

    torch.manual_seed(0)
    native = torch.nn.Conv3d(channels, out, 3, stride=stride, padding=1)
    fast = use_fast_cpu_convolutions(torch.nn.Sequential(torch.nn.Conv3d(channels, out, 3, stride=stride, padding=1)))
    fast.load_state_dict({f"0.{k}": v for k, v in native.state_dict().items()})
    fast.to(memory_format=layout)
    assert type(fast[0]) is Conv3d
    x = torch.randn(1, channels, size, size, size).contiguous(memory_format=layout).requires_grad_()
    y1, y2 = native(x), fast(x)
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-5)
    g1 = torch.autograd.grad(y1.pow(2).sum(), [x, native.weight, native.bias])
    g2 = torch.autograd.grad(y2.pow(2).sum(), [x, fast[0].weight, fast[0].bias])
    for a, b in zip(g1, g2, strict=True):  # sums over thousands of voxels: compare relative to the scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))
    assert g2[0].is_contiguous(memory_format=layout)  # the input gradient keeps the input's layout


def test_fast_cpu_convolution_of_an_input_without_gradient_and_no_bias():
    """The first layer: only the weight gradient is asked for, on both backward paths."""
    from mstkd.model.conv import use_fast_cpu_convolutions

    torch.manual_seed(0)
    for channels in (4, 16):
        native = torch.nn.Conv3d(channels, 16, 3, padding=1, bias=False)
        fast = use_fast_cpu_convolutions(torch.nn.Sequential(torch.nn.Conv3d(channels, 16, 3, padding=1, bias=False)))
        fast.load_state_dict({f"0.{k}": v for k, v in native.state_dict().items()})
        x = torch.randn(1, channels, 16, 16, 16)
        (g1,) = torch.autograd.grad(native(x).pow(2).sum(), [native.weight])
        (g2,) = torch.autograd.grad(fast(x).pow(2).sum(), [fast[0].weight])
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5 * float(g1.abs().max()))
