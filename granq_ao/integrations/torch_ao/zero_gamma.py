"""Fused Conv-BN QAT modules whose BatchNorm weight (gamma) is exactly 0 somewhere: finite outputs.

torch.ao's ``ConvBn{1,2,3}d`` / ``ConvBnReLU{1,2,3}d`` QAT forward, with ``sf = gamma / sqrt(running_var + eps)``::

    y = BN(conv(x, fq(w * sf)) / sf + b)

divides by ``sf``: a channel with ``gamma == 0`` (timm's ``zero_init_last``, torchvision's
``zero_init_residual``, a pruned channel) computes ``0 / 0 = NaN``, and the NaN spreads through
the next layers (torch.ao's own default qconfig outputs NaN silently). That channel's true
output is ``BN(...) = 0 * normalized + beta = beta`` whatever the conv computes. This module's
forward replaces ``sf`` by ``1 / sqrt(running_var + eps)`` (gamma taken as 1) in those channels
only, in the weight scaling and in the division alike::

    sf_safe = where(sf == 0, 1 / sqrt(running_var + eps), sf)
    y = BN(conv(x, fq(w * sf_safe)) / sf_safe + b)

So a zero-gamma channel gives ``beta`` (finite), its gamma gets BN's usual gradient (the
normalized conv output, with the weight fake-quantized as the channel's ``w / std``) and can
leave 0 in training; every other channel computes exactly torch.ao's operations, bit for bit.
Installed (as an instance attribute shadowing ``_forward_approximate``, as
:mod:`.frozen_bn` does; ``type()``, parameters and state dict unchanged) only on the modules
whose gamma holds an exact 0 when :func:`route_zero_gamma_batchnorm` runs:
:func:`granq_ao.prepare_qat_fx` calls it; after torch.ao's eager ``prepare_qat``, call it yourself.
"""
from __future__ import annotations

import types
from typing import List

import torch
from torch import nn
from torch.ao.nn.intrinsic.qat.modules.conv_fused import _ConvBnNd

from granq_ao.diagnostics import locate_in_caller

__all__ = ["unrouted_zero_gamma_note", "safe_scale_factor", "zero_gamma_safe_forward", "route_zero_gamma_batchnorm", "has_zero_gamma", "is_routed"]

_ATTRIBUTE = "_forward_approximate"


def has_zero_gamma(bn: nn.Module) -> bool:
    """Whether a BatchNorm's weight holds an exact 0."""
    weight = getattr(bn, "weight", None)
    return weight is not None and bool((weight.detach() == 0).any())


def safe_scale_factor(bn: nn.Module) -> torch.Tensor:
    """``sf = gamma / sqrt(running_var + eps)`` (torch.ao's expression, bit for bit), with
    ``1 / sqrt(running_var + eps)`` where ``sf == 0`` (module docstring)."""
    running_std = torch.sqrt(bn.running_var + bn.eps)
    scale_factor = bn.weight / running_std
    return torch.where(scale_factor == 0, running_std.reciprocal(), scale_factor)


def zero_gamma_safe_forward(self: _ConvBnNd, input: torch.Tensor) -> torch.Tensor:
    """torch.ao's approximate Conv-BN QAT forward with ``sf`` of zero-gamma channels taken as
    ``1 / std`` (module docstring)."""
    bn = self.bn
    scale_factor = safe_scale_factor(bn)
    weight_shape = [1] * self.weight.dim()
    weight_shape[0] = -1
    channel_shape = [1] * self.weight.dim()
    channel_shape[1] = -1
    weight = self.weight_fake_quant(self.weight * scale_factor.reshape(weight_shape))
    zero_bias = torch.zeros(self.out_channels, device=weight.device, dtype=input.dtype)
    conv = self._conv_forward(input, weight, zero_bias) / scale_factor.reshape(channel_shape)
    if self.bias is not None:
        conv = conv + self.bias.reshape(channel_shape)
    return bn(conv)


def route_zero_gamma_batchnorm(model: nn.Module) -> List[str]:
    """Give every fused Conv-BN QAT module of ``model`` whose BN weight holds an exact 0 the
    zero-safe forward (module docstring); returns their names (``"layer1.0.bn2"``-style names
    of the fused modules, e.g. ``"layer1.0.conv2"``)."""
    routed = []
    for name, module in model.named_modules():
        if isinstance(module, _ConvBnNd) and has_zero_gamma(module.bn) and _ATTRIBUTE not in module.__dict__:
            setattr(module, _ATTRIBUTE, types.MethodType(zero_gamma_safe_forward, module))
            routed.append(name)
    return routed


def unrouted_zero_gamma_note(module: nn.Module) -> str:
    """For an error message about NaN reaching ``module`` (a fake-quant): ``""``, or a sentence
    naming the fused Conv-BN modules of the running model whose BN weight holds a 0 and that run
    torch.ao's dividing forward (the cause), with the way out. Walks the call stack: error paths only."""
    location = locate_in_caller(module)
    if location is None:
        return ""
    _, owner = location
    names = [name for name, held in owner.named_modules()
             if isinstance(held, _ConvBnNd) and has_zero_gamma(held.bn) and _ATTRIBUTE not in held.__dict__]
    if not names:
        return ""
    return (f". Likely cause: the BatchNorm weight of fused Conv-BN '{names[0]}' ({len(names)} module(s)) holds "
            "exact zeros, and torch.ao's conv-bn QAT forward divides by gamma / sqrt(var + eps); call "
            "granq_ao.integrations.torch_ao.route_zero_gamma_batchnorm(model) after prepare_qat "
            "(granq_ao.prepare_qat_fx does it)")


def is_routed(module: nn.Module) -> bool:
    """Whether ``module`` runs :func:`zero_gamma_safe_forward`."""
    method = module.__dict__.get(_ATTRIBUTE)
    return isinstance(method, types.MethodType) and method.__func__ is zero_gamma_safe_forward
