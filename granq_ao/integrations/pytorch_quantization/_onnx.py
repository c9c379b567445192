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

from granq_ao.onnx_export import as_input_tuple, export_onnx_bytes, write_bytes

__all__ = ["export_onnx", "baked_weight_quantizers", "OnnxMismatchWarning"]


class OnnxMismatchWarning(UserWarning):
    """The exported graph's outputs differ from the PyTorch model's on the example inputs."""


def _check_against_onnxruntime(model: torch.nn.Module, args: Tuple[Any, ...], data: bytes) -> Optional[float]:
    """Max ``|onnxruntime - PyTorch|`` on ``args`` (model in eval), with an
    :class:`OnnxMismatchWarning` when it exceeds ``1e-5 * max|output| + 1e-6``; ``None`` (no
    check) without onnxruntime or for non-tensor inputs/outputs.

    Why they can differ: onnxruntime's kernels (convolutions, matmuls) sum in another order than
    PyTorch's, and pytorch-quantization's ``QuantizeLinear`` export (``use_fb_fake_quant``)
    clamps to int8 [-128, 127] where its default PyTorch fake-quant clamps to [-127, 127].
    Such float-level differences move values across rounding boundaries, and every low-bit step
    downstream (a 4-bit GranQ step is a sizeable part of a slice's range) amplifies them: deep
    networks can end up with differences of a noticeable fraction of their outputs."""
    try:
        import onnxruntime
    except ImportError:
        return None
    if not all(isinstance(a, torch.Tensor) for a in args):
        return None
    was_training = model.training
    try:
        with torch.no_grad():
            expected = model.eval()(*args)
    finally:
        model.train(was_training)
    if not isinstance(expected, torch.Tensor):
        return None
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    feeds = {inp.name: a.detach().cpu().numpy() for inp, a in zip(session.get_inputs(), args)}
    got = torch.from_numpy(session.run(None, feeds)[0])
    expected = expected.detach().cpu().to(got.dtype)
    diff = float((got - expected).abs().max())
    if diff > 1e-5 * float(expected.abs().max()) + 1e-6:
        warnings.warn(
            f"the ONNX graph's output differs from PyTorch's by up to {diff:.4g} on the example inputs "
            f"(output std {float(expected.float().std()):.4g}): onnxruntime's kernels round floats "
            "differently (summation order; pytorch-quantization's QuantizeLinear export clamps to "
            "[-128, 127] where its PyTorch fake-quant clamps to [-127, 127]) and each low-bit rounding step "
            "downstream amplifies that. Validate the ONNX model on your data; it is not bit-exact.",
            OnnxMismatchWarning, stacklevel=3)
    return diff


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
                dynamic_batch: bool = True, check: bool = True) -> bytes:
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
        check: run the exported graph in onnxruntime (when installed) on ``example_inputs`` and
            warn (:class:`OnnxMismatchWarning`) when its outputs differ from the model's in eval
            by more than float noise (see :func:`_check_against_onnxruntime`).
    """
    args = as_input_tuple(example_inputs)
    was_training = model.training
    model.eval()
    bake = baked_weight_quantizers(model) if bake_weights else contextlib.nullcontext()
    try:
        with bake:
            data = export_onnx_bytes(model, args, dynamo=dynamo, opset_version=opset_version,
                                     input_names=input_names, output_names=output_names,
                                     dynamic_batch=dynamic_batch)
    finally:
        model.train(was_training)
    if check:
        _check_against_onnxruntime(model, args, data)
    return write_bytes(data, f)
