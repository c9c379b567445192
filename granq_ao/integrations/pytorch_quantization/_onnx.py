"""ONNX export of models holding GranQ quantizers, with a dynamic batch axis.

Under export, :class:`GranQTensorQuantizer` runs the eager ops of
:func:`granq_ao.functional.fake_quantize`, so the graph computes every range from its own
input at run time: ``ReduceMin``/``ReduceMax`` over space -> ``Sub``/``Div`` (scale) ->
``Neg``/``Div``/``Round`` (zero point) -> ``Div``/``Add``/``Round``/``Clip``/``Sub``/``Mul``.
No range of the dummy input is frozen into the graph.

pytorch-quantization's own weight quantizer branches in Python on its amax (``if min_amax <
0``), which ``torch.export`` (the ``dynamo=True`` exporter, torch's default) refuses. With
``bake_weights=True`` (default) each enabled weight quantizer is applied once before export
and switched off during it: the graph stores the fake-quantized weights (values on the
weight grid, in float) and both exporters work. Weights are restored afterwards.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["export_onnx", "baked_weight_quantizers"]


@contextlib.contextmanager
def baked_weight_quantizers(model: torch.nn.Module) -> Iterator[int]:
    """Within the block, every enabled ``_weight_quantizer`` is applied to its weight once and
    disabled; yields how many were baked. Weights and quantizer states are restored after."""
    saved: List[Tuple[torch.nn.Module, torch.Tensor]] = []  # only enabled quantizers are baked
    try:
        with torch.no_grad():
            for module in model.modules():
                quantizer = getattr(module, "_weight_quantizer", None)
                weight = getattr(module, "weight", None)
                if quantizer is None or weight is None or quantizer._disabled:
                    continue
                saved.append((module, weight.detach().clone()))
                weight.copy_(quantizer(weight))
                quantizer.disable()
        yield len(saved)
    finally:
        with torch.no_grad():
            for module, original in saved:
                module.weight.copy_(original)
                module._weight_quantizer._disabled = False


def export_onnx(model: torch.nn.Module, example_inputs: Any, f: Union[str, io.BytesIO, None] = None, *,
                dynamo: bool = False, bake_weights: bool = True, opset_version: Optional[int] = None,
                input_names: Sequence[str] = ("input",), output_names: Sequence[str] = ("output",),
                dynamic_batch: bool = True) -> bytes:
    """Export ``model`` (in eval mode) to ONNX with batch dim 0 dynamic; returns the model bytes
    (and writes them to ``f`` when given).

    Args:
        example_inputs: a tensor or a tuple of tensors (any batch size >= 2 for ``dynamo=True``).
        dynamo: ``False`` uses the TorchScript exporter (default here: it needs no extra
            packages and gives a plain opset-17 graph); ``True`` uses ``torch.export``
            (``onnxscript`` required). Both emit the same GranQ ops; tests run both.
        bake_weights: see the module docstring; needed for ``dynamo=True`` when
            pytorch-quantization weight quantizers are enabled.
        opset_version: default 17 for TorchScript, the exporter's default for dynamo.
    """
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    was_training = model.training
    model.eval()
    bake = baked_weight_quantizers(model) if bake_weights else contextlib.nullcontext()
    try:
        with bake, warnings.catch_warnings():
            # Python-side shape checks (e.g. ``x.numel() == 0``) are constant for any batch size.
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
