"""Refusing torch.ao's eager ``convert`` and its lowered FX ``convert_fx`` on a GranQ model, at
once and with the way out.

Kept apart from :mod:`.eager` (the converter) so that the fake-quant and observer modules can
call it without importing the converter, which imports them.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import sys

__all__ = ["refuse_torch_eager_convert", "called_by_torch_eager_convert", "TORCH_EAGER_CONVERT_MESSAGE",
           "refuse_torch_convert", "called_by_torch_lowered_convert_fx", "TORCH_CONVERT_FX_MESSAGE"]

TORCH_EAGER_CONVERT_MESSAGE = (
    "torch.ao.quantization.convert cannot convert a GranQ model: GranQ computes one activation "
    "range per (sample, channel) from every input, at run time, while torch's eager quantized "
    "modules hold one static scale per tensor. Use granq_ao.convert_eager(model) for a reference "
    "model with the QAT model's numbers (its outputs equal the QAT model's in eval).")

TORCH_CONVERT_FX_MESSAGE = (
    "torch.ao.quantization.quantize_fx.convert_fx cannot lower a GranQ model: GranQ computes one "
    "activation range per (sample, channel) from every input, at run time, and torch's quantized "
    "kernels take one static scale per tensor (with per-channel activation qparams convert_fx would "
    "leave a static reference graph whose quantized ops, e.g. hardsigmoid, fail at the first forward "
    "with 'Expected quantizer->qscheme() == kPerTensorAffine'). Use granq_ao.convert_to_reference_fx(model) "
    "for a reference model with the QAT model's numbers (mode='static' for the observers' running "
    "ranges). torch's convert_fx works in place: convert a copy, or prepare again.")


# ----------------------------------------------------------------------------- refusing torch's convert
@functools.lru_cache(maxsize=1)
def _torch_eager_convert_codes() -> frozenset:
    """Code objects of torch.ao's eager ``convert`` / ``_convert`` / ``swap_module`` (decorators
    unwrapped); empty if a future torch has none of them."""
    try:
        module = importlib.import_module("torch.ao.quantization.quantize")
    except ImportError:  # pragma: no cover - torch without the eager API
        return frozenset()
    codes = set()
    for name in ("convert", "_convert", "swap_module"):
        function = getattr(module, name, None)
        code = getattr(inspect.unwrap(function), "__code__", None) if function is not None else None
        if code is not None:
            codes.add(code)
    return frozenset(codes)


def called_by_torch_eager_convert() -> bool:
    """Whether torch.ao's eager ``convert`` (or its ``swap_module``) is on the call stack."""
    codes = _torch_eager_convert_codes()
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def refuse_torch_eager_convert() -> None:
    """Raise ``RuntimeError`` (:data:`TORCH_EAGER_CONVERT_MESSAGE`) when called from inside
    torch.ao's eager ``convert``; do nothing otherwise.

    ``GranQFakeQuantize.calculate_qparams`` and ``GranQObserver.calculate_qparams`` call it first.
    torch's eager converter asks each observed module for its qparams (``from_float`` ->
    ``calculate_qparams``) before it builds a quantized module from them, so this stops it at
    the first GranQ quantizer it reaches, before any module is swapped, instead of the
    ``float(scale)`` failure deep inside torch ("only one element tensors can be converted to
    Python scalars") or, for a per-tensor GranQ config, a silently static model that does not
    compute GranQ. Caveat: with ``inplace=True`` torch's ``from_float`` of a QAT Conv-BN module
    has already folded the BatchNorm into that module's weight before it calls any GranQ code;
    torch's default (``inplace=False``) converts a copy and leaves the model intact.

    Mechanism: the caller is recognised by *identity of code objects*: the frames on the stack
    are compared with the ``__code__`` of ``torch.ao.quantization.quantize.convert``,
    ``_convert`` and ``swap_module`` (decorators unwrapped). No file names or function names are
    matched, so nothing else can be mistaken for them (FX's ``convert_to_reference_fx`` /
    ``convert_fx``, a user's own call of ``calculate_qparams``, granq_ao's static export all go
    on working), and it costs one short stack walk per ``calculate_qparams`` call (never in
    forward). torch's ``prepare_qat`` also runs ``convert`` (to swap in QAT modules) but asks for
    no qparams there. If a torch release drops those functions, the check turns itself off.
    Alternatives rejected: a flag set by ``prepare_qat`` cannot tell the eager converter from a
    legitimate caller (FX static export of the same modules); replacing torch's functions
    (monkeypatching) would change torch for everything in the process.
    """
    if called_by_torch_eager_convert():
        raise RuntimeError(TORCH_EAGER_CONVERT_MESSAGE)


@functools.lru_cache(maxsize=1)
def _torch_convert_fx_code():
    """Code object of ``torch.ao.quantization.quantize_fx._convert_fx`` (``None`` if absent)."""
    try:
        module = importlib.import_module("torch.ao.quantization.quantize_fx")
    except ImportError:  # pragma: no cover
        return None
    function = getattr(module, "_convert_fx", None)
    return getattr(inspect.unwrap(function), "__code__", None) if function is not None else None


def called_by_torch_lowered_convert_fx() -> bool:
    """Whether torch.ao's ``_convert_fx`` is on the call stack with ``is_reference=False`` (what
    ``convert_fx`` calls; ``convert_to_reference_fx`` and the decomposed converter pass True)."""
    code = _torch_convert_fx_code()
    frame = sys._getframe(1)
    while frame is not None and code is not None:
        if frame.f_code is code:
            return not frame.f_locals.get("is_reference", True)
        frame = frame.f_back
    return False


def refuse_torch_convert() -> None:
    """:func:`refuse_torch_eager_convert`, and ``RuntimeError`` (:data:`TORCH_CONVERT_FX_MESSAGE`)
    inside torch's lowered ``convert_fx``. ``calculate_qparams`` of GranQ quantizers call it.

    torch's ``convert_fx`` asks every activation fake-quant (and every weighted module's weight
    fake-quant) for static qparams while it rewrites the graph, so the first GranQ quantizer it
    reaches stops it. It could not lower anyway (its lowering patterns need
    ``quantize_per_tensor``): what it left was a static reference graph, and on conv ->
    hardsigmoid (every torchvision MobileNetV3) one that raised at its first forward. Same
    mechanism as :func:`refuse_torch_eager_convert`: the frame is recognised by code identity,
    and its ``is_reference`` argument tells ``convert_fx`` from ``convert_to_reference_fx``.
    torch converts in place: QAT modules it reached before the first GranQ fake-quant may
    already be swapped (convert a copy)."""
    refuse_torch_eager_convert()
    if called_by_torch_lowered_convert_fx():
        raise RuntimeError(TORCH_CONVERT_FX_MESSAGE)
