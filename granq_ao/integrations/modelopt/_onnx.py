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
import warnings
from typing import Any, Iterator, Optional, Sequence, Union

import torch

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
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    was_training = model.training
    model.eval()
    try:
        with granq_export_mode(model), warnings.catch_warnings():
            # Python-side shape checks (e.g. ``inputs.numel() == 0``) are constant for any batch size.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            if dynamo:
                dynamic_shapes = tuple({0: torch.export.Dim("batch")} for _ in args) if dynamic_batch else None
                program = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=dynamic_shapes,
                                            input_names=list(input_names), output_names=list(output_names),
                                            opset_version=opset_version, verbose=False)
                data = program.model_proto.SerializeToString()
            else:
                buffer = io.BytesIO()
                axes = {name: {0: "batch"} for name in (*input_names, *output_names)} if dynamic_batch else None
                torch.onnx.export(model, args, buffer, dynamo=False, input_names=list(input_names),
                                  output_names=list(output_names), dynamic_axes=axes,
                                  opset_version=opset_version or 17)
                data = buffer.getvalue()
    finally:
        model.train(was_training)
    if isinstance(f, str):
        with open(f, "wb") as handle:
            handle.write(data)
    elif f is not None:
        f.write(data)
    return data
