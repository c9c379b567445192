"""The converted form of ``GranQQATConfig`` (``step="convert"``, ``target="reference"``).

A reference module is the host layer class (``nn.Conv2d``, ``nn.ConvTranspose2d``, ``nn.Linear``,
...; ``isinstance`` holds) with float ``weight``/``bias`` and explicit dynamic quantization on
both operands, through the registered ops (:func:`granq_ao.qdq_graph.dynamic_qdq`)::

    y = op(qdq(x, input_config), qdq(weight, weight_config), bias)
    qdq(t, c) = granq_ao::dequantize(granq_ao::quantize(t, *granq_ao::choose_qparams_dynamic(t, c)))

equal to the QAT module in eval bit for bit (the same math, :mod:`granq_ao.functional`). A
config of ``None`` leaves that operand in float (a fake-quant that was disabled in QAT). The two
configs are saved with the ``state_dict`` and checked on load (:mod:`granq_ao.saved_settings`);
:meth:`GranQReference.to_float` gives the plain layer back.
``torch.export`` of a model of reference modules records the ``granq_ao`` ops, so it saves and
loads with ``torch.export.save``/``load`` (the loading process imports ``granq_ao``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from granq_ao.config import GranQConfig
from granq_ao.qdq_graph import dynamic_qdq
from granq_ao.quantizer_state import QuantizerStateMixin

from .layer_forward import (QuantizedConvForward, QuantizedConvTransposeForward, QuantizedLinearForward,
                            host_layer_class)
from .module_swap import rebuild_as

__all__ = ["GranQReference", "GranQReferenceConv1d", "GranQReferenceConv2d", "GranQReferenceConv3d",
           "GranQReferenceConvTranspose1d", "GranQReferenceConvTranspose2d", "GranQReferenceConvTranspose3d",
           "GranQReferenceLinear", "REFERENCE_CLASSES"]


class GranQReference(QuantizerStateMixin):
    """The hooks of the reference form: ``qdq`` through the ``granq_ao`` ops (module docstring).

    Attributes: ``input_config``, ``weight_config`` (a :class:`GranQConfig` or ``None``)."""

    input_config: Optional[GranQConfig]
    weight_config: Optional[GranQConfig]

    @classmethod
    def from_module(cls, module: nn.Module, input_config: Optional[GranQConfig],
                    weight_config: Optional[GranQConfig], drop=()) -> nn.Module:
        """A reference module sharing ``module``'s parameters (``drop``: sub-modules to leave out)."""
        for name, config in (("input_config", input_config), ("weight_config", weight_config)):
            if config is not None and not isinstance(config, GranQConfig):
                raise TypeError(f"{name} must be a GranQConfig or None, got {config!r}")
        reference = rebuild_as(cls, module, drop=drop)
        reference.input_config, reference.weight_config = input_config, weight_config
        return reference

    def to_float(self) -> nn.Module:
        """The plain host layer (``nn.Conv2d``, ...) with these weights, no quantization."""
        return rebuild_as(host_layer_class(type(self)), self, drop=("input_config", "weight_config"))

    # the two configs travel with the state_dict (granq_ao.quantizer_state): a state_dict from a
    # reference model of other settings is refused; a float checkpoint (no settings) loads
    def saved_configs(self):
        return (self.input_config, self.weight_config)

    def _qdq(self, value: torch.Tensor, config: Optional[GranQConfig], what: str) -> torch.Tensor:
        if config is None:
            return value
        try:
            return dynamic_qdq(value, config)
        except (ValueError, TypeError) as error:  # NonFiniteInputError included
            raise self.labelled(error, what) from None

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return self._qdq(x, self.input_config, "input")

    def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self._qdq(weight, self.weight_config, "weight")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, input: {self.input_config}, weight: {self.weight_config}"


class GranQReferenceConv1d(GranQReference, QuantizedConvForward, nn.Conv1d):
    pass


class GranQReferenceConv2d(GranQReference, QuantizedConvForward, nn.Conv2d):
    pass


class GranQReferenceConv3d(GranQReference, QuantizedConvForward, nn.Conv3d):
    pass


class GranQReferenceConvTranspose1d(GranQReference, QuantizedConvTransposeForward, nn.ConvTranspose1d):
    pass


class GranQReferenceConvTranspose2d(GranQReference, QuantizedConvTransposeForward, nn.ConvTranspose2d):
    pass


class GranQReferenceConvTranspose3d(GranQReference, QuantizedConvTransposeForward, nn.ConvTranspose3d):
    pass


class GranQReferenceLinear(GranQReference, QuantizedLinearForward, nn.Linear):
    pass


#: float layer class -> its reference class
REFERENCE_CLASSES = {
    nn.Conv1d: GranQReferenceConv1d, nn.Conv2d: GranQReferenceConv2d, nn.Conv3d: GranQReferenceConv3d,
    nn.ConvTranspose1d: GranQReferenceConvTranspose1d, nn.ConvTranspose2d: GranQReferenceConvTranspose2d,
    nn.ConvTranspose3d: GranQReferenceConvTranspose3d, nn.Linear: GranQReferenceLinear,
}
