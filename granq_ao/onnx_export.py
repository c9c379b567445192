"""ONNX export of a GranQ model with a dynamic batch dimension, for every toolchain's adapter.

Under an exporting tracer :mod:`granq_ao.functional` records its plain ops, so the graph computes
each activation's ranges from its own input at run time (ReduceMin/ReduceMax -> scale, zero
point -> Div/Round/Clip -> Sub/Mul): it runs at any batch size. An adapter wraps
:func:`export_onnx_bytes` in whatever its toolchain needs during export (e.g. baked weight
quantizers, an export mode) and checks the result its own way.
"""
from __future__ import annotations

import io
import warnings
from typing import Any, Optional, Sequence, Tuple, Union

import torch

__all__ = ["export_onnx_bytes", "as_input_tuple", "write_bytes"]


def as_input_tuple(example_inputs: Any) -> Tuple[Any, ...]:
    """``example_inputs`` as the tuple of positional arguments the exporter takes."""
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def export_onnx_bytes(model: torch.nn.Module, args: Tuple[Any, ...], *, dynamo: bool = False,
                      opset_version: Optional[int] = None, input_names: Sequence[str] = ("input",),
                      output_names: Sequence[str] = ("output",), dynamic_batch: bool = True) -> bytes:
    """The ONNX bytes of ``model(*args)`` as it is (call it in eval mode), dim 0 dynamic when
    ``dynamic_batch``. ``dynamo=False``: the TorchScript exporter (opset 17 by default, no extra
    package); ``True``: ``torch.export`` + onnxscript (batch of the example >= 2)."""
    with warnings.catch_warnings():
        # Python-side shape checks (e.g. ``x.numel() == 0``) are constant for any batch size.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if dynamo:
            dynamic_shapes = tuple({0: torch.export.Dim("batch")} for _ in args) if dynamic_batch else None
            program = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=dynamic_shapes,
                                        input_names=list(input_names), output_names=list(output_names),
                                        opset_version=opset_version, verbose=False)
            return program.model_proto.SerializeToString()
        buffer = io.BytesIO()
        axes = {name: {0: "batch"} for name in (*input_names, *output_names)} if dynamic_batch else None
        torch.onnx.export(model, args, buffer, dynamo=False, input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=axes, opset_version=opset_version or 17)
        return buffer.getvalue()


def write_bytes(data: bytes, f: Union[str, io.BytesIO, None]) -> bytes:
    """Write ``data`` to the path or file object ``f`` (if any); return ``data``."""
    if isinstance(f, str):
        with open(f, "wb") as handle:
            handle.write(data)
    elif f is not None:
        f.write(data)
    return data
