"""The forward of a quantized conv / transposed conv / linear layer, shared by the QAT form and
the converted (reference) form of :class:`~.qat_config.GranQQATConfig`::

    y = op(quantize_input(x), quantize_weight(weight), bias)

``op`` is the host layer's own operation (``nn.ConvNd._conv_forward`` with its stride, padding,
padding mode..., ``conv_transposeNd`` with the output padding ``nn.ConvTransposeNd`` computes,
or ``linear``). The two hooks are the only difference between the forms: fake-quant modules
in QAT, the registered ``torch.ops.granq_ao`` q/dq ops after conversion.

Unbatched input (``(C, *spatial)`` for a convolution, ``(F,)`` for a linear layer, as the host
layers accept) is one sample: it gets that sample's ranges. ``(N, T, F)`` input of a linear layer
gets one range per (n, t) row (per token) under GranQ's default granularity.

``quantize_weight`` always sees a weight laid out as a convolution's, ``(out, in / groups, *k)``
(or linear's ``(out, in)``), so "per output channel" is axis 0 for every layer. A transposed
convolution stores ``(in, out / groups, *k)``; :func:`transposed_to_conv_layout` and
:func:`conv_to_transposed_layout` move between the two (output channel ``o = g * out/groups + j``
of group ``g``), so its weights get one range per output channel as a convolution's do.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as nn_functional
from torch import nn

__all__ = ["QuantizedConvForward", "QuantizedConvTransposeForward", "QuantizedLinearForward",
           "transposed_to_conv_layout", "conv_to_transposed_layout", "HOST_LAYER_CLASSES", "host_layer_class"]

_CONV_TRANSPOSE = (nn_functional.conv_transpose1d, nn_functional.conv_transpose2d, nn_functional.conv_transpose3d)

#: the host layer classes both forms derive from (and quantize_ swaps)
HOST_LAYER_CLASSES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                      nn.Linear)


def host_layer_class(cls: type) -> type:
    """The first of :data:`HOST_LAYER_CLASSES` among ``cls``'s bases (``nn.Conv2d`` for
    ``GranQQATConv2d``); ``StopIteration`` if it has none."""
    return next(base for base in cls.__mro__ if base in HOST_LAYER_CLASSES)


def transposed_to_conv_layout(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``(in, out/groups, *k)`` -> ``(out, in/groups, *k)``: a transposed convolution's weight
    indexed by output channel first (a view-and-copy, differentiable)."""
    in_channels, out_per_group, kernel = weight.shape[0], weight.shape[1], weight.shape[2:]
    grouped = weight.reshape(groups, in_channels // groups, out_per_group, *kernel).transpose(1, 2)
    return grouped.reshape(groups * out_per_group, in_channels // groups, *kernel)


def conv_to_transposed_layout(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of :func:`transposed_to_conv_layout`."""
    out_channels, in_per_group, kernel = weight.shape[0], weight.shape[1], weight.shape[2:]
    grouped = weight.reshape(groups, out_channels // groups, in_per_group, *kernel).transpose(1, 2)
    return grouped.reshape(groups * in_per_group, out_channels // groups, *kernel)


class _QuantizedHooks:
    """The two hooks each form implements."""

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class QuantizedConvForward(_QuantizedHooks):
    """For an ``nn.Conv1d/2d/3d`` subclass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == self.weight.dim() - 1:  # unbatched (C, *spatial), as the host accepts: one sample
            return self.forward(x.unsqueeze(0)).squeeze(0)
        return self._conv_forward(self.quantize_input(x), self.quantize_weight(self.weight), self.bias)


class QuantizedConvTransposeForward(_QuantizedHooks):
    """For an ``nn.ConvTranspose1d/2d/3d`` subclass (``output_size`` as the host takes it)."""

    def forward(self, x: torch.Tensor, output_size: Optional[List[int]] = None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            raise ValueError(f"Only `zeros` padding mode is supported for {type(self).__name__}")
        if x.dim() == self.weight.dim() - 1:  # unbatched (C, *spatial): one sample
            return self.forward(x.unsqueeze(0), output_size).squeeze(0)
        spatial_dims = self.weight.dim() - 2
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size,
                                              spatial_dims, self.dilation)
        weight = transposed_to_conv_layout(self.weight, self.groups)
        weight = conv_to_transposed_layout(self.quantize_weight(weight), self.groups)
        return _CONV_TRANSPOSE[spatial_dims - 1](self.quantize_input(x), weight, self.bias, self.stride, self.padding,
                                                 output_padding, self.groups, self.dilation)


class QuantizedLinearForward(_QuantizedHooks):
    """For an ``nn.Linear`` subclass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 1:  # one unbatched vector, as the host accepts: one sample
            return self.forward(x.unsqueeze(0)).squeeze(0)
        return nn_functional.linear(self.quantize_input(x), self.quantize_weight(self.weight), self.bias)
