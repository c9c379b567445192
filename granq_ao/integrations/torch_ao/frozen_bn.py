"""A cheaper forward for torch.ao's fused Conv-BN QAT modules whose BN statistics are frozen.

torch.ao's ``ConvBn{1,2,3}d`` / ``ConvBnReLU{1,2,3}d`` QAT modules compute, with
``sf = gamma / sqrt(running_var + eps)`` (per output channel)::

    y = BN_eval(conv(x, fq(w * sf)) / sf + b)                 # torch.ao's _forward_approximate

i.e. a full-size division and a full BatchNorm pass (forward and backward) after every conv.
When the BN runs on its running statistics (``freeze_bn_stats``, eval mode: the zero-shot
student), the same map in real arithmetic is::

    y = conv(x, fq(w * sf), bias = beta + (b - running_mean) * sf)   # this module's forward

with the same parameters (``w``, ``b``, ``gamma``, ``beta``), the same weight fake-quant input
``w * sf`` (so any weight granularity), and therefore the same gradients with respect to every
parameter in real arithmetic; only float rounding differs (ulps of the conv output, which can
flip a later low-bit rounding of an activation that sits on a rounding boundary). The parameters,
state dict, ``type()`` of each module and torch.ao's conversion are unchanged: the faster forward
is an instance attribute shadowing ``_forward_approximate``, removed again by
:func:`unfold_frozen_batchnorm`. A module whose BN is in training mode (batch statistics) keeps
torch.ao's forward at every call (in its zero-gamma-safe form, :mod:`.zero_gamma`: the same
operations where no gamma is 0). A zero gamma needs nothing here: ``sf = 0`` multiplies, never divides.

This is not the "fold BN into the conv before prepare" alternative (``fuse_fx`` in eval mode),
which makes ``w * sf`` and the folded bias the trainable parameters: the same function at the
start, but a different optimization problem (per-channel learning rate scaled by ``sf^2``, no
separate ``gamma``/``beta``, weight decay on other quantities).
"""
from __future__ import annotations

import types

import torch
from torch import nn
from torch.ao.nn.intrinsic.qat.modules.conv_fused import _ConvBnNd

from .zero_gamma import route_zero_gamma_batchnorm, zero_gamma_safe_forward

__all__ = ["fold_frozen_batchnorm", "unfold_frozen_batchnorm", "is_folded"]

_ATTRIBUTE = "_forward_approximate"


def _frozen_bn_forward(self: _ConvBnNd, input: torch.Tensor) -> torch.Tensor:
    """``conv(x, fq(w * sf), beta + (b - mean) * sf)``; torch.ao's forward when the BN is training."""
    bn = self.bn
    if bn.running_var is None:
        return type(self)._forward_approximate(self, input)
    if bn.training:
        return zero_gamma_safe_forward(self, input)
    running_std = torch.sqrt(bn.running_var + bn.eps)
    scale_factor = bn.weight / running_std if bn.weight is not None else 1.0 / running_std
    weight_shape = [1] * self.weight.dim()
    weight_shape[0] = -1
    weight = self.weight_fake_quant(self.weight * scale_factor.reshape(weight_shape))
    shift = -bn.running_mean if self.bias is None else self.bias - bn.running_mean
    bias = shift * scale_factor
    if bn.bias is not None:
        bias = bias + bn.bias
    return self._conv_forward(input, weight, bias.to(input.dtype))


def fold_frozen_batchnorm(model: nn.Module) -> int:
    """Give every fused Conv-BN QAT module of ``model`` the frozen-BN forward (module docstring);
    returns how many modules were changed."""
    count = 0
    for module in model.modules():
        if isinstance(module, _ConvBnNd):
            setattr(module, _ATTRIBUTE, types.MethodType(_frozen_bn_forward, module))
            count += 1
    return count


def unfold_frozen_batchnorm(model: nn.Module) -> int:
    """Undo :func:`fold_frozen_batchnorm` (torch.ao's own forward again, zero-gamma-safe where a
    gamma is 0: :mod:`.zero_gamma`); returns the count."""
    count = 0
    for module in model.modules():
        if is_folded(module):
            del module.__dict__[_ATTRIBUTE]
            count += 1
    route_zero_gamma_batchnorm(model)
    return count


def is_folded(module: nn.Module) -> bool:
    """Whether ``module`` (a fused Conv-BN QAT module) runs the frozen-BN forward."""
    method = module.__dict__.get(_ATTRIBUTE) if isinstance(module, _ConvBnNd) else None
    return isinstance(method, types.MethodType) and method.__func__ is _frozen_bn_forward
