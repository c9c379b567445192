"""GranQ's dynamic quantize/dequantize as registered ``torch.library`` ops: ``torch.ops.granq_ao.*``.

Converted (reference) graphs of every toolchain call these ops, so a graph holds named,
schema-checked operators instead of opaque Python functions: it pickles, re-traces, exports
with ``torch.export`` and round-trips through ``torch.export.save``/``load`` (import
``granq_ao`` first in the loading process, which registers the ops). The math is
:mod:`granq_ao.functional`; for an input ``x`` of ``b`` bits::

    scale, zero_point = granq_ao::choose_qparams_dynamic(x, b, granularity, axis, symmetric, check_finite)
        # x_min, x_max over the reduced dims (GranQ: per (n, c));  s = (x_max - x_min) / (2^b - 1),
        # z = round(-x_min / s)  (symmetric: s = max|x| / ((2^b - 1) / 2), z = 0);  float32, keepdim
        # (float64 for float64 x)
    x_q   = granq_ao::quantize(x, scale, zero_point, b, symmetric)
        # clamp(round(x / s + z), q_min, q_max) as uint8 (int8 when symmetric)
    x_hat = granq_ao::dequantize(x_q, scale, zero_point, x)
        # (x_q - z) * s in x's dtype; x itself where s == 0 (an empty range passes through)

``x_hat`` equals ``functional.fake_quantize(x, b, granularity, axis, symmetric)`` bit for bit.

A shared quantizer's later application (``y`` an op's output, ``source`` the input of the first
application; :func:`granq_ao.functional.fake_quantize_shared`)::

    y_hat = granq_ao::fake_quantize_shared(y, source, b, granularity, axis, symmetric, check_finite)
        # choose_qparams_dynamic(source), viewed for y where y keeps source's (n, c) layout,
        # then quantize -> dequantize of y; y itself where the layout changed
``granularity`` is ``"granq"``, ``"channel"`` or ``"tensor"``. NaN/inf input raises
:class:`~granq_ao.functional.NonFiniteInputError` when ``check_finite``.
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import functional

__all__ = ["choose_qparams_dynamic", "quantize", "dequantize", "fake_quantize_shared"]


@torch.library.custom_op("granq_ao::choose_qparams_dynamic", mutates_args=())
def choose_qparams_dynamic(x: torch.Tensor, bits: int, granularity: str, axis: int, symmetric: bool,
                           check_finite: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` (float32, float64 for float64 ``x``; keepdim) from ``x``'s own ranges (module docstring)."""
    x_min, x_max = functional.reduce_min_max(x, granularity, axis)
    if check_finite:
        functional.check_finite_ranges(x_min, x_max, symmetric)
    return functional.compute_qparams(x_min, x_max, bits, symmetric)


@choose_qparams_dynamic.register_fake
def _choose_qparams_dynamic_fake(x, bits, granularity, axis, symmetric, check_finite):
    shape = functional.ranges_shape(x, granularity, axis)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(shape, dtype=dtype), x.new_empty(shape, dtype=dtype)


@torch.library.custom_op("granq_ao::quantize", mutates_args=())
def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
             symmetric: bool) -> torch.Tensor:
    """Integer codes ``clamp(round(x / s + z), q_min, q_max)``: uint8, or int8 when symmetric."""
    return functional.quantize(x, scale, zero_point, bits, symmetric)


@quantize.register_fake
def _quantize_fake(x, scale, zero_point, bits, symmetric):
    return x.new_empty(x.shape, dtype=torch.int8 if symmetric else torch.uint8)


@torch.library.custom_op("granq_ao::dequantize", mutates_args=())
def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               passthrough: torch.Tensor) -> torch.Tensor:
    """``(codes - z) * s`` in ``passthrough``'s dtype; ``passthrough`` (the input) where ``s == 0``."""
    return functional.dequantize(codes, scale, zero_point, passthrough=passthrough, dtype=passthrough.dtype)


@dequantize.register_fake
def _dequantize_fake(codes, scale, zero_point, passthrough):
    return passthrough.new_empty(codes.shape)


@torch.library.custom_op("granq_ao::fake_quantize_shared", mutates_args=())
def fake_quantize_shared(y: torch.Tensor, source: torch.Tensor, bits: int, granularity: str, axis: int,
                         symmetric: bool, check_finite: bool) -> torch.Tensor:
    """``y`` on the grid of ``source``'s qparams where ``y`` keeps its layout (module docstring)."""
    scale, zero_point = choose_qparams_dynamic(source, bits, granularity, axis, symmetric, check_finite)
    qparams = functional.qparams_for_layout(scale, zero_point, y, granularity, axis)
    if qparams is None:
        return y.clone()
    codes = functional.quantize(y, qparams[0], qparams[1], bits, symmetric)
    return functional.dequantize(codes, qparams[0], qparams[1], passthrough=y, dtype=y.dtype)


@fake_quantize_shared.register_fake
def _fake_quantize_shared_fake(y, source, bits, granularity, axis, symmetric, check_finite):
    return torch.empty_like(y)
