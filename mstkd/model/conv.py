"""Faster 3-D convolutions for batch-1 training on CPU.

PyTorch picks its CPU convolution kernel with a rule tuned for 2-D images: oneDNN is used
only when ``N * C * D * H > 20480`` (or N > 1, among other cases), otherwise a generic
"slow_conv3d" path runs. For batch-1 3-D U-Nets that rule sends most of the network to the
slow path, whose backward pass is 3-8x slower than oneDNN's (measured on 2 cores: a 16-channel
3x3x3 convolution on 32^3 voxels takes 115 ms forward+backward natively, 15 ms here).

:func:`use_fast_cpu_convolutions` swaps every ``nn.Conv3d`` of a module for
:class:`Conv3d`, which routes exactly those calls (CPU, float32, batch 1, small ``C * D * H``,
with or without gradients) through oneDNN. The forward calls ``mkldnn_convolution``. The
backward calls ``convolution_backward`` in one of two ways that make the kernel rule choose
oneDNN:

- where both the input and the output have at least 16 channels, on the input and the incoming
  gradient converted to oneDNN's own tensor layout (``Tensor.to_mkldnn``);
- otherwise on a batch padded with one zero sample (it adds nothing to the weight gradient, and
  its input gradient is dropped). This costs twice the arithmetic, but for narrow layers the
  layout conversion costs more: an 8-channel backward on 32^3 voxels took 4.6 ms padded and
  5.2 ms converted, a 4-channel one on 64^3 18.8 and 33.2 ms.

On two cores a ``lite`` MST-KD step is about 12 % faster with the first way than with padding
everywhere (0.760 against 0.860 s, median of 18 steps each, alternated in one process); with the
first way from 8 channels or from 1 it took 0.684 and 0.706 s against 0.668 s from 16 (another
such run). ``bench_train.py`` measures the step.

Results equal the native ones to float32 rounding; parameters and state dicts are unchanged;
everything else (GPU, larger batches, oneDNN switched off) takes PyTorch's own path.
"""

from __future__ import annotations

import torch
from torch import nn

_NATIVE_ONEDNN_THRESHOLD = 20480
_OPAQUE_MIN_CHANNELS = 16  # narrower layers: the zero-sample padding is cheaper than the layout conversion


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
        need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
        opaque = min(x.shape[1], grad.shape[1]) >= _OPAQUE_MIN_CHANNELS
        if opaque:
            grad_in, x_in = grad.to_mkldnn(), x.to_mkldnn()
        else:
            grad_in, x_in = torch.cat([grad, torch.zeros_like(grad)]), torch.cat([x, torch.zeros_like(x)])
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad_in,
            x_in,
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
        if gx is not None and opaque:  # back to x's layout
            cl = x.is_contiguous(memory_format=torch.channels_last_3d)
            gx = gx.to_dense().contiguous(memory_format=torch.channels_last_3d if cl else torch.contiguous_format)
        elif gx is not None:
            gx = gx[:1]
        return gx, gw, gb, None, None, None, None


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
            and torch.backends.mkldnn.enabled
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
