"""The QAT form of ``GranQQATConfig``: conv / transposed conv / linear layers with GranQ fake-quants.

Each class derives from the host layer class it replaces (``GranQQATConv2d`` is an
``nn.Conv2d``, ...), shares that layer's ``weight``/``bias`` parameters and computes::

    y = op(fq_act(x), fq_w(weight), bias)      (op, weight layout: :mod:`.layer_forward`)

``fq_act`` (``input_fake_quant``) is GranQ's dynamic fake-quant of the input (``scheme.activation``:
one range per (sample, channel) by default) and ``fq_w`` (``weight_fake_quant``) the weight's
(``scheme.weight``: per output channel by default, for transposed convolutions too), both
:class:`~.fake_quantize.GranQPT2EFakeQuantize` with straight-through gradients.
:meth:`GranQQAT.to_float` and :meth:`GranQQAT.to_reference` are the two ways back (``quantize_``'s
convert step).
"""
from __future__ import annotations

from torch import nn

from granq_ao.config import GranQScheme

from .fake_quantize import GranQPT2EFakeQuantize
from .layer_forward import (QuantizedConvForward, QuantizedConvTransposeForward, QuantizedLinearForward,
                            host_layer_class)
from .module_swap import rebuild_as
from .reference_modules import REFERENCE_CLASSES

__all__ = ["GranQQAT", "GranQQATConv", "GranQQATConv1d", "GranQQATConv2d", "GranQQATConv3d",
           "GranQQATConvTranspose", "GranQQATConvTranspose1d", "GranQQATConvTranspose2d", "GranQQATConvTranspose3d",
           "GranQQATLinear", "QAT_CLASSES"]

_QAT_STATE = ("input_fake_quant", "weight_fake_quant", "scheme")


class GranQQAT:
    """The hooks of the QAT form (two fake-quant modules) and the swaps in and out."""

    scheme: GranQScheme

    @classmethod
    def from_float(cls, module: nn.Module, scheme: GranQScheme) -> nn.Module:
        """A QAT module sharing ``module``'s parameters (and hyper-parameters)."""
        qat = rebuild_as(cls, module)
        qat.scheme = scheme
        qat.input_fake_quant = GranQPT2EFakeQuantize(config=scheme.activation)
        qat.weight_fake_quant = GranQPT2EFakeQuantize(config=scheme.weight)
        return qat

    def quantize_input(self, x):
        return self.input_fake_quant(x)

    def quantize_weight(self, weight):
        return self.weight_fake_quant(weight)

    @property
    def float_class(self) -> type:
        """The host layer class this module replaced (``nn.Conv2d``, ...)."""
        return host_layer_class(type(self))

    def to_float(self) -> nn.Module:
        """The plain host layer (exact ``float_class``) with the trained parameters, no quantization."""
        return rebuild_as(self.float_class, self, drop=_QAT_STATE)

    def to_reference(self) -> nn.Module:
        """The reference form (:mod:`.reference_modules`): explicit ``granq_ao`` q/dq ops on the
        input and the weight, equal to this module in eval; a disabled fake-quant stays float."""
        configs = [fake_quant.config if fake_quant.fake_quant_on else None
                   for fake_quant in (self.input_fake_quant, self.weight_fake_quant)]
        return REFERENCE_CLASSES[self.float_class].from_module(self, *configs, drop=_QAT_STATE)


class GranQQATConv(GranQQAT, QuantizedConvForward):
    """``conv(fq_act(x), fq_w(weight), bias)`` for the ``nn.ConvNd`` it derives with."""


class GranQQATConv1d(GranQQATConv, nn.Conv1d):
    pass


class GranQQATConv2d(GranQQATConv, nn.Conv2d):
    pass


class GranQQATConv3d(GranQQATConv, nn.Conv3d):
    pass


class GranQQATConvTranspose(GranQQAT, QuantizedConvTransposeForward):
    """``conv_transpose(fq_act(x), fq_w(weight), bias)`` (weight ranges per output channel)."""


class GranQQATConvTranspose1d(GranQQATConvTranspose, nn.ConvTranspose1d):
    pass


class GranQQATConvTranspose2d(GranQQATConvTranspose, nn.ConvTranspose2d):
    pass


class GranQQATConvTranspose3d(GranQQATConvTranspose, nn.ConvTranspose3d):
    pass


class GranQQATLinear(GranQQAT, QuantizedLinearForward, nn.Linear):
    """``linear(fq_act(x), fq_w(weight), bias)``."""


#: float layer class -> its QAT class
QAT_CLASSES = {
    nn.Conv1d: GranQQATConv1d, nn.Conv2d: GranQQATConv2d, nn.Conv3d: GranQQATConv3d,
    nn.ConvTranspose1d: GranQQATConvTranspose1d, nn.ConvTranspose2d: GranQQATConvTranspose2d,
    nn.ConvTranspose3d: GranQQATConvTranspose3d, nn.Linear: GranQQATLinear,
}
