"""The bottleneck vision transformer of MST-KDNet, exposing attention maps and hidden states.

The attention probabilities are returned with their gradients (MONAI's ``SABlock`` keeps
only a detached copy), because the extreme-value attention distillation trains the
student through them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention that also returns its post-softmax, pre-dropout weights.

    Shapes: ``x`` is ``B x N x E``; returns ``(B x N x E, B x heads x N x N)``.
    """

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.attn_drop = nn.Dropout(dropout)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, e = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(e // self.heads), dim=-1)
        out = (self.attn_drop(weights) @ v).transpose(1, 2).reshape(b, n, e)
        return self.proj_drop(self.proj(out)), weights


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))`` with a ReLU MLP."""

    def __init__(self, hidden: int, heads: int, mlp: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = Attention(hidden, heads, dropout)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(mlp, hidden),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, weights = self.attn(self.norm1(x))
        x = x + y
        return x + self.mlp(self.norm2(x)), weights


class BottleneckViT(nn.Module):
    """Patch embedding of a ``B x C x h x w x d`` feature map, a learned position embedding and ``layers`` blocks.

    The position embedding is learned for ``grid`` (the token grid of the training input) and
    interpolated trilinearly for any other grid, so whole volumes can be processed.

    Returns the hidden states ``B x N x E`` and attention maps ``B x heads x N x N`` of
    ``taps`` evenly spaced layers (for 12 layers and 4 taps: layers 3, 6, 9, 12), and the
    token grid ``(h/p, w/p, d/p)``.
    """

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        layers: int,
        heads: int,
        mlp: int,
        patch: int,
        dropout: float,
        taps: int,
        grid: tuple[int, int, int],
    ) -> None:
        super().__init__()
        if layers % taps:
            raise ValueError(f"{layers} layers cannot be tapped at {taps} evenly spaced points")
        self.patch = patch
        self.grid = tuple(grid)
        self.embed = nn.Conv3d(in_channels, hidden, kernel_size=patch, stride=patch)
        self.position = nn.Parameter(torch.zeros(1, math.prod(grid), hidden))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(hidden, heads, mlp, dropout) for _ in range(layers))
        self.tap_layers = tuple(layers // taps * (i + 1) for i in range(taps))

    def position_embedding(self, grid: tuple[int, int, int]) -> torch.Tensor:
        if tuple(grid) == self.grid:
            return self.position
        e = self.position.shape[-1]
        table = self.position.transpose(1, 2).reshape(1, e, *self.grid)
        table = F.interpolate(table, size=grid, mode="trilinear", align_corners=False)
        return table.reshape(1, e, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], tuple[int, int, int]]:
        tokens = self.embed(x)
        grid = tuple(tokens.shape[2:])
        h = self.drop(tokens.flatten(2).transpose(1, 2) + self.position_embedding(grid))
        hidden, attention = [], []
        for depth, block in enumerate(self.blocks, start=1):
            h, weights = block(h)
            if depth in self.tap_layers:
                hidden.append(h)
                attention.append(weights)
        return hidden, attention, grid  # type: ignore[return-value]
