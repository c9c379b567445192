"""``GranQQATConfig``: GranQ QAT through ``torchao.quantization.quantize_`` for eager models.

    quantize_(model, GranQQATConfig(GranQScheme.from_kwargs(4, 4)), filter_fn=is_conv_or_linear)

swaps every ``nn.Conv1d/2d/3d`` and ``nn.Linear`` (exact types; ``quantize_``'s default filter
selects Linear only, hence ``filter_fn``) for a GranQ QAT module of the same class family that
keeps the same ``weight``/``bias`` parameters and computes, for input ``x``::

    y = op(fq_act(x), fq_w(weight), bias)        op = conv (same stride, padding, ...) or linear

with ``fq_act`` = GranQ dynamic fake-quant of the input (``scheme.activation``: per (sample,
channel) by default) and ``fq_w`` = fake-quant of the weight (``scheme.weight``: min/max per
output channel by default); both :class:`~.fake_quantize.GranQPT2EFakeQuantize` modules
(``input_fake_quant``, ``weight_fake_quant``), straight-through gradients.

Eager module swapping sees no data flow, so the placement is always "every swapped layer's
input" (``scheme.placement`` must be ``"all"``); the paper's ReLU-output placement needs the
graph: use :class:`~.quantizer.GranQQuantizer` (PT2E).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as nn_functional
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization import register_quantize_module_handler

from granq_ao.config import GranQScheme

from .fake_quantize import GranQPT2EFakeQuantize

__all__ = ["GranQQATConfig", "GranQQATConv1d", "GranQQATConv2d", "GranQQATConv3d", "GranQQATLinear",
           "GranQQATConv", "is_conv_or_linear"]


@dataclass(frozen=True)
class GranQQATConfig(AOBaseConfig):
    """``quantize_`` config: swap conv/linear modules for GranQ QAT modules (module docstring)."""

    scheme: GranQScheme = field(default_factory=GranQScheme)

    def __post_init__(self) -> None:
        if not isinstance(self.scheme, GranQScheme):
            raise TypeError(f"scheme must be a GranQScheme, got {self.scheme!r}")
        if self.scheme.placement != "all":
            raise ValueError(
                "GranQQATConfig quantizes the input of every swapped layer (act_placement='all'); "
                "the paper's ReLU-output placement needs the graph: use GranQQuantizer with prepare_qat_pt2e")


class _GranQQAT:
    """The swap shared by the QAT classes: same parameters, two GranQ fake-quants."""

    def _attach(self, scheme: GranQScheme) -> None:
        self.scheme = scheme
        self.input_fake_quant = GranQPT2EFakeQuantize(config=scheme.activation)
        self.weight_fake_quant = GranQPT2EFakeQuantize(config=scheme.weight)

    @classmethod
    def from_float(cls, module: nn.Module, scheme: GranQScheme) -> nn.Module:
        """A QAT module sharing ``module``'s parameters (and hyper-parameters)."""
        qat = cls.__new__(cls)
        # hyper-parameters; the same Parameter objects in new parameter/buffer/hook dicts
        qat.__dict__.update({key: value.copy() if isinstance(value, dict) else value
                             for key, value in module.__dict__.items()})
        qat._attach(scheme)
        return qat


class GranQQATConv(_GranQQAT):
    """``conv(fq_act(x), fq_w(weight), bias)`` for the ``nn.ConvNd`` it derives with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_fake_quant(x), self.weight_fake_quant(self.weight), self.bias)


class GranQQATConv1d(GranQQATConv, nn.Conv1d):
    pass


class GranQQATConv2d(GranQQATConv, nn.Conv2d):
    pass


class GranQQATConv3d(GranQQATConv, nn.Conv3d):
    pass


class GranQQATLinear(_GranQQAT, nn.Linear):
    """``linear(fq_act(x), fq_w(weight), bias)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn_functional.linear(self.input_fake_quant(x), self.weight_fake_quant(self.weight), self.bias)


_SWAPS = {nn.Conv1d: GranQQATConv1d, nn.Conv2d: GranQQATConv2d, nn.Conv3d: GranQQATConv3d,
          nn.Linear: GranQQATLinear}


def is_conv_or_linear(module: nn.Module, fqn: str = "") -> bool:
    """``quantize_`` filter: a plain ``nn.Conv1d/2d/3d`` or ``nn.Linear`` (exact type, so an
    already swapped module is not swapped again)."""
    return type(module) in _SWAPS


@register_quantize_module_handler(GranQQATConfig)
def _swap_for_granq_qat(module: nn.Module, config: GranQQATConfig) -> nn.Module:
    qat_class = _SWAPS.get(type(module))
    if qat_class is None:
        raise TypeError(f"GranQQATConfig swaps nn.Conv1d/2d/3d and nn.Linear, got {type(module).__name__}; "
                        "call quantize_(model, config, filter_fn=is_conv_or_linear)")
    return qat_class.from_float(module, config.scheme)
