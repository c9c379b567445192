"""ONNX export of a modelopt model holding GranQ quantizers, with a dynamic batch axis.

Under export, the ``"granq"`` backend runs the eager ops of :mod:`granq_ao.functional`, so the
graph computes every range from its own input at run time: ``ReduceMin``/``ReduceMax`` over
space -> ``Sub``/``Div`` (scale) -> ``Neg``/``Div``/``Round`` (zero point) ->
``Div``/``Add``/``Round``/``Clip``/``Sub``/``Mul``; weights go through the same ops (per output
channel) on their stored float values. Nothing of the dummy input is frozen into the graph.

modelopt's ``TensorQuantizer.forward`` asserts, under the TorchScript exporter, that every
enabled quantizer holds a calibrated ``_amax`` ("Quantizer has not been calibrated. ONNX export
requires the quantizer to be calibrated."). GranQ quantizers have no amax by design, so for
``dynamo=False`` that readiness check is switched off on them (and only them) during export
(:func:`granq_export_mode`; usable around modelopt's own exporter too). ``dynamo=True``
(``torch.export``) does not run the check.
"""
from __future__ import annotations

import contextlib
import io
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from granq_ao.onnx_export import as_input_tuple, export_onnx_bytes, write_bytes

from ._backend import is_granq_quantizer

__all__ = ["export_onnx", "granq_export_mode"]


def _no_amax_needed(inputs: torch.Tensor) -> None:
    """Stands in for ``TensorQuantizer._check_onnx_readiness`` on GranQ quantizers."""


@contextlib.contextmanager
def granq_export_mode(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, modelopt's "has this quantizer a calibrated amax?" export check is off
    for the GranQ quantizers of ``model`` (they never have one: ranges come from each input).
    Other quantizers keep the check."""
    quantizers = [module for module in model.modules() if is_granq_quantizer(module)]
    try:
        for quantizer in quantizers:
            quantizer._check_onnx_readiness = _no_amax_needed  # instance attribute, removed after
        yield
    finally:
        for quantizer in quantizers:
            quantizer.__dict__.pop("_check_onnx_readiness", None)


def export_onnx(model: torch.nn.Module, example_inputs: Any, f: Union[str, io.BytesIO, None] = None, *,
                dynamo: bool = False, opset_version: Optional[int] = None,
                input_names: Sequence[str] = ("input",), output_names: Sequence[str] = ("output",),
                dynamic_batch: bool = True) -> bytes:
    """Export ``model`` (in eval mode; its training flag is restored) to ONNX with batch dim 0
    dynamic; returns the model bytes (and writes them to ``f`` when given).

    Args:
        example_inputs: a tensor or a tuple of tensors (batch >= 2 for ``dynamo=True``).
        dynamo: ``False``: the TorchScript exporter (plain opset-17 graph, no extra packages);
            ``True``: ``torch.export`` + onnxscript. Both emit the same GranQ ops.
        opset_version: default 17 for TorchScript, the exporter's default for dynamo.
    """
    args = as_input_tuple(example_inputs)
    was_training = model.training
    model.eval()
    try:
        with granq_export_mode(model):
            data = export_onnx_bytes(model, args, dynamo=dynamo, opset_version=opset_version,
                                     input_names=input_names, output_names=output_names,
                                     dynamic_batch=dynamic_batch)
    finally:
        model.train(was_training)
    return write_bytes(data, f)
