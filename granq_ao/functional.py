"""The quantization math of granq_ao, once. Every adapter and every baseline calls this module.

For an input ``x`` and ``b`` bits, ranges are reduced over the dimensions that the granularity
does not keep (for GranQ, over space: one range per (sample n, channel c)):

    x_min, x_max = min(x), max(x)                  over the reduced dims (keepdim)
    asymmetric (paper, default), integer grid [0, 2^b - 1]:
        s = (x_max - x_min) / (2^b - 1)
        z = round(-x_min / s)
    symmetric (torch.ao's convention), integer grid [-2^(b-1), 2^(b-1) - 1]:
        s = max(|x_min|, |x_max|) / ((2^b - 1) / 2)
        z = 0
    x_q   = clamp(round(x / s + z), q_min, q_max)  (round half to even, as torch.round)
    x_hat = (x_q - z) * s

Where a range is empty (``s == 0``) the values pass through unchanged, exactly: asymmetric,
a constant slice (``x_max == x_min``); symmetric, an all-zero slice. (A symmetric constant
slice ``v != 0`` is quantized like any other: ``s = |v| / ((2^b - 1) / 2)``, as torch.ao does.) Backward is the straight-through estimator: ``dL/dx = dL/dx_hat``, the
gradient passes unchanged (no clipping mask, no gradient to the ranges), as in the paper.

Numbers are computed in float32 (float64 for float64 input: its ranges, tiny values and constant
slices would not survive a float32 cast) and returned in the input's dtype (fp16/bf16 inputs
included; min/max are exact in any float dtype, so ranges are reduced in the input's dtype).
Ranges, scales and zero points are float32, or float64 for float64 input.

Input that cannot be quantized is refused with :class:`NonFiniteInputError` (``check_finite``,
the default): NaN or +-inf, and, on the asymmetric grid, a finite range whose width
``x_max - x_min`` overflows the compute dtype (float32 values near +-3.4e38), which would give
an infinite scale and NaN outputs.

Two code paths compute the same numbers:

* ``eager``: plain PyTorch ops.
* ``compiled``: the whole dynamic step (ranges, qparams, elementwise fake-quant) as one
  ``torch.compile`` graph (one kernel: each (n, c) row is reduced and quantized while it is
  in cache, instead of about ten eager passes over ``x``). It runs the *same Python
  function* as eager, and the test suite checks bit-identity. It is used when ``torch.compile``
  works here; otherwise the eager path is used and a warning says so once.

Choose with ``fused=`` (:data:`granq_ao.config.FUSED_MODES`: ``"auto"``, ``"compiled"`` (or
an error), ``"eager"``; legacy ``None``/``True``/``False`` mean the same) or, for ``"auto"``, the
``GRANQ_FUSED`` environment variable (``auto`` | ``compiled`` | ``eager``; ``1``/``0`` also read);
``fused_backend()`` tells which path the auto choice took.

Every function here takes its options either as keywords (``bits=3, granularity="granq"``) or
as one :class:`granq_ao.config.GranQConfig` in place of ``bits``:
``fake_quantize(x, GranQConfig(bits=3))``. Options are validated there, once.
"""
from __future__ import annotations

import logging
import os
import types
import warnings
from typing import Any, Optional, Tuple, Union

import torch

from .config import (MAX_BITS, MIN_BITS, GranQConfig, as_granularity, normalize_fused, quant_range,
                     keyword_defaults, reject_options_with)
from .granularity import Granularity, PerTensor

__all__ = [
    "quant_range",
    "reduce_min_max",
    "ranges_shape",
    "compute_qparams",
    "fake_quantize",
    "fake_quantize_with_qparams",
    "fake_quantize_from_ranges",
    "fake_quantize_dynamic",
    "qparams_for_layout",
    "fake_quantize_shared",
    "quantize",
    "dequantize",
    "fused_backend",
    "check_input",
    "check_finite_ranges",
    "NonFiniteInputError",
    "MIN_BITS",
    "MAX_BITS",
]

GranularityLike = Union[str, Granularity]


class NonFiniteInputError(ValueError):
    """Raised when an input to be quantized holds NaN or +-inf."""


# ----------------------------------------------------------------------------- validation
def check_input(x: torch.Tensor, granularity: GranularityLike = "granq", axis: int = 1) -> Granularity:
    """Validate ``x`` for ``granularity`` and return the granularity object.

    Raises ``TypeError`` (not a floating-point tensor) or ``ValueError`` (rank < 2 for a
    per-channel granularity, channel axis out of range). Empty tensors are validated too.
    """
    granularity = as_granularity(granularity, axis)
    _check_input(x, granularity)
    granularity.kept_dims(x.dim())  # validates the channel axis
    return granularity


def _check_input(x: torch.Tensor, granularity: Granularity) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"GranQ quantizes floating-point tensors; got dtype {x.dtype}. "
            "Convert the input to float first."
        )
    if not isinstance(granularity, PerTensor) and x.dim() < 2:
        raise ValueError(
            f"{granularity.name} quantization needs an input of rank >= 2 (batch, channels, ...); "
            f"got shape {tuple(x.shape)}"
        )


def check_finite_ranges(x_min: torch.Tensor, x_max: torch.Tensor, symmetric: bool = True) -> None:
    """Raise :class:`NonFiniteInputError` unless every range is finite. min/max propagate NaN
    and +-inf, so checking the small range tensors checks all of ``x`` (one host sync).
    ``symmetric=False`` (the asymmetric grid, whose scale is ``(x_max - x_min) / (2^b - 1)``)
    also refuses finite ranges whose width ``x_max - x_min`` overflows the compute dtype."""
    _raise_unless_finite(_all_finite(x_min, x_max, symmetric), x_min, x_max)


def _all_finite(x_min: torch.Tensor, x_max: torch.Tensor, symmetric: bool = True) -> torch.Tensor:
    """0-dim bool tensor: every range is finite and, asymmetric, so is its width (computed
    inside the compiled step too)."""
    finite = torch.isfinite(x_min).all() & torch.isfinite(x_max).all()
    if not symmetric:
        finite = finite & torch.isfinite(x_max - x_min).all()
    return finite


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 tensors, else float32 (fp16/bf16/float32): the dtype GranQ computes in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _to_compute(t: torch.Tensor, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``t`` in the compute dtype of ``like`` (default: of ``t`` itself)."""
    return t.to(_compute_dtype((t if like is None else like).dtype))


def _tracing() -> bool:
    """Whether a TorchScript tracer (``torch.jit.trace``, the TorchScript ONNX exporter) is recording."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


_NON_FINITE_MESSAGE = "input holds NaN or infinite values; GranQ cannot quantize them"
_ASSERT_MESSAGE = ("input holds NaN or infinite values, or a range whose width max - min overflows; "
                   "GranQ cannot quantize them")


def _overflow_message(x_min: torch.Tensor, x_max: torch.Tensor) -> str:
    width = x_max - x_min
    index = int(torch.nonzero(~torch.isfinite(width).flatten())[0])
    low, high = float(x_min.flatten()[index]), float(x_max.flatten()[index])
    return (f"a range of the input is too wide to quantize: max - min = {high:.4g} - ({low:.4g}) "
            f"overflows {x_min.dtype} (largest {torch.finfo(x_min.dtype).max:.4g}). Scale the input "
            "down, use symmetric=True (scale from max |x|), or quantize it in float64.")


def _raise_unless_finite(all_finite: torch.Tensor, x_min: Optional[torch.Tensor] = None,
                         x_max: Optional[torch.Tensor] = None) -> None:
    """Eager: one host read of the flag, :class:`NonFiniteInputError` if it is False. Inside a
    user's ``torch.compile`` region: a device-side assert instead (no graph break; it fails the
    call with a ``RuntimeError`` carrying the same message). While tracing for export: nothing
    (a traced ``bool()`` is not recorded in the graph; it would only warn)."""
    if _tracing() or all_finite.device.type == "meta":  # meta tensors hold no values to check
        return
    if torch.compiler.is_compiling():
        torch._assert_async(all_finite, _ASSERT_MESSAGE)
        return
    if not bool(all_finite):
        if (x_min is not None and x_max is not None and bool(torch.isfinite(x_min).all())
                and bool(torch.isfinite(x_max).all())):
            raise NonFiniteInputError(_overflow_message(x_min, x_max))
        raise NonFiniteInputError(_NON_FINITE_MESSAGE)


# ----------------------------------------------------------------------------- ranges
def reduce_min_max(x: torch.Tensor, granularity: GranularityLike = "granq", axis: int = 1,
                   check_finite: bool = False, iterative: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Float32 (float64 for float64 ``x``) ``(x_min, x_max)`` reduced over every dim the granularity does not keep.

    The result has ``x``'s rank with size 1 on reduced dims (it broadcasts against ``x``).
    ``iterative=True`` (or the name ``"granq_iterative"``) computes the very same numbers with a
    Python loop over the kept indices: the slow reference of the paper's latency figure. An empty ``x`` gives zero
    (empty) ranges: nothing is quantized. ``check_finite``: raise
    :class:`NonFiniteInputError` on NaN/inf (used by converted reference graphs).
    """
    iterative = iterative or granularity == "granq_iterative"
    granularity = check_input(x, granularity, axis)
    kept = granularity.kept_dims(x.dim())
    if x.numel() == 0:
        no_range = x.new_zeros(_kept_shape(x, kept), dtype=_compute_dtype(x.dtype))
        return no_range, no_range
    if iterative:
        x_min, x_max = _reduce_min_max_loop(x, kept)
    else:
        reduced = _reduced_dims(granularity, x.dim())
        if reduced:
            x_min, x_max = _min_max_over(x, reduced)
        else:  # every dim kept: each element is its own range
            x_min = x_max = _to_compute(x)
    if check_finite:
        check_finite_ranges(x_min, x_max)
    return x_min, x_max


def _reduced_dims(granularity: Granularity, ndim: int) -> Tuple[int, ...]:
    kept = granularity.kept_dims(ndim)
    return tuple(d for d in range(ndim) if d not in kept)


def _min_max_over(x: torch.Tensor, reduced: Tuple[int, ...]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keepdim min/max (compute dtype: float32, float64 for float64) over ``reduced`` (never empty: ``amin(dim=())`` would reduce over
    ALL dims). min/max of fp16/bf16 values are exact: reduced in x's dtype, then cast."""
    return _to_compute(x.amin(dim=reduced, keepdim=True)), _to_compute(x.amax(dim=reduced, keepdim=True))


def ranges_shape(x: torch.Tensor, granularity: GranularityLike = "granq", axis: int = 1) -> list:
    """The shape of the ranges (and qparams) that :func:`reduce_min_max` gives for ``x``: ``x``'s
    shape with size 1 on every reduced dim (works on fake/meta tensors and symbolic sizes)."""
    return _kept_shape(x, as_granularity(granularity, axis).kept_dims(x.dim()))


def _kept_shape(x: torch.Tensor, kept: Tuple[int, ...]) -> list:
    """``x``'s shape with size 1 on every dim not in ``kept`` (the keepdim shape of ranges)."""
    return [x.shape[d] if d in kept else 1 for d in range(x.dim())]


def _reduce_min_max_loop(x: torch.Tensor, kept: Tuple[int, ...]):
    x_min = x.new_empty(_kept_shape(x, kept), dtype=_compute_dtype(x.dtype))
    x_max = x.new_empty(_kept_shape(x, kept), dtype=_compute_dtype(x.dtype))
    moved = x.movedim(kept, tuple(range(len(kept))))
    for index in torch.cartesian_prod(*[torch.arange(x.shape[d]) for d in kept]).reshape(-1, len(kept)).tolist():
        block = moved[tuple(index)]
        out_index = [slice(None)] * x.dim()
        for d, i in zip(kept, index):
            out_index[d] = i
        x_min[tuple(out_index)] = block.min()
        x_max[tuple(out_index)] = block.max()
    return x_min, x_max


def compute_qparams(x_min: torch.Tensor, x_max: torch.Tensor, bits: int, symmetric: bool = False
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` from ranges, float32 (float64 for float64 ranges), (the module docstring's formula).

    ``scale`` is 0 where the range is empty (those values pass through unchanged);
    ``zero_point`` holds integers stored as floats (0 there).
    """
    q_min, q_max = quant_range(bits, symmetric)
    return _qparams(_to_compute(x_min), _to_compute(x_max, x_min), q_min, q_max, symmetric)


def _qparams(x_min: torch.Tensor, x_max: torch.Tensor, q_min: int, q_max: int, symmetric: bool):
    if symmetric:
        scale = torch.maximum(x_min.abs(), x_max.abs()) / ((q_max - q_min) / 2)
        return scale, torch.zeros_like(scale)
    scale = (x_max - x_min) / (q_max - q_min)
    zero_point = torch.where(scale > 0, torch.round(-x_min / _safe_scale(scale)), torch.zeros_like(scale))
    return scale, zero_point


# ----------------------------------------------------------------------------- elementwise step
def _safe_scale(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` with 1 where it is 0 (empty ranges), so dividing by it is always defined."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _codes(xf: torch.Tensor, safe_scale: torch.Tensor, zero_point: torch.Tensor, q_min: int,
           q_max: int) -> torch.Tensor:
    """``clamp(round(x / s + z), q_min, q_max)`` as a new tensor (``xf``'s dtype): the one rounding
    expression of the package (fake-quant, integer codes, conversion). One new tensor, then in
    place: eager ~2.5x faster than a fresh tensor per op; compiled, fused either way. ``xf`` is
    never written (it may alias the caller's input)."""
    return (xf / safe_scale).add_(zero_point).round_().clamp_(q_min, q_max)


def _fake_quantize_elementwise(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                               q_min: int, q_max: int) -> torch.Tensor:
    """``(clamp(round(x / s + z), q_min, q_max) - z) * s`` in the compute dtype; ``x`` itself where s == 0."""
    xf = _to_compute(x)
    has_range = scale > 0
    safe_scale = _safe_scale(scale)
    x_hat = _codes(xf, safe_scale, zero_point, q_min, q_max).sub_(zero_point).mul_(safe_scale)
    if torch.compiler.is_compiling() or _tracing():
        return torch.where(has_range, x_hat, xf).to(x.dtype)  # traced graphs: no out= aliasing
    if x_hat.device.type == "cpu" and bool(has_range.all()):
        # Every range non-empty (the usual case): the select would keep x_hat everywhere. Reading
        # the small flag costs less than the full-size pass it saves (~1/3 of this function's
        # time on CPU); on CUDA the read would synchronize, so the select stays there.
        return x_hat.to(x.dtype)
    return torch.where(has_range, x_hat, xf, out=x_hat).to(x.dtype)  # eager: no new allocation


def _dynamic_fake_quantize(x: torch.Tensor, reduced: Tuple[int, ...], q_min: int, q_max: int,
                           symmetric: bool):
    """The whole dynamic step: ranges over ``reduced`` dims, qparams, elementwise fake-quant,
    and the finiteness flag of the ranges. Returns ``(x_hat, x_min, x_max, all_finite, scale,
    zero_point)``. One function for the eager and the compiled path.

    ``scale`` and ``zero_point`` are returned (and dropped by the caller) so that the compiled
    kernel stores them once per range: inlined into the elementwise loop instead, inductor
    re-derives them (two divisions and a rounding) for every 8-wide vector of ``x``, which made
    the step ~20% slower on a 2-core CPU at (200, 16, 32, 32)."""
    x_min, x_max = _min_max_over(x, reduced)
    scale, zero_point = _qparams(x_min, x_max, q_min, q_max, symmetric)
    x_hat = _fake_quantize_elementwise(x, scale, zero_point, q_min, q_max)
    return x_hat, x_min, x_max, _all_finite(x_min, x_max, symmetric), scale, zero_point


_auto_backend: Optional[str] = None  # "compiled" | "eager", decided at the first auto call
_compiled = {}


def _env_fused() -> str:
    """The ``"auto"`` choice as ``GRANQ_FUSED`` refines it: auto | compiled | eager (1/0 read too)."""
    value = os.environ.get("GRANQ_FUSED", "auto").strip().lower()
    value = {"": "auto", "1": "compiled", "0": "eager"}.get(value, value)
    return normalize_fused(value, "GRANQ_FUSED")


def _get_compiled(fn, args):
    """The torch.compile'd ``fn`` for the pattern of ``args`` (per tensor: rank, dtype, device
    type; other arguments by value). Each pattern compiles a copy of ``fn``'s code object:
    torch._dynamo keeps its graphs, and its recompile limit (8), per code object, so a process
    that mixes many patterns (ranks, granularities, dtypes, bit widths) never exceeds the limit
    and silently falls back to eager. ``dynamic=True``: one graph per pattern, not per shape."""
    key = (fn,) + tuple((a.dim(), a.dtype, a.device.type) if isinstance(a, torch.Tensor) else a
                        for a in args)
    compiled = _compiled.get(key)
    if compiled is None:
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" noise
        copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                                  fn.__defaults__, fn.__closure__)
        compiled = _compiled[key] = torch.compile(copy, dynamic=True)
    return compiled


def fused_backend(fused: Any = "auto") -> str:
    """Which path ``fake_quantize`` takes for this ``fused`` argument: ``"compiled"`` or
    ``"eager"``. With ``"auto"`` (and no ``GRANQ_FUSED``) it is ``"compiled"`` unless compiling
    failed here (or was never tried yet, which returns ``"auto"``)."""
    fused = normalize_fused(fused)
    if fused == "auto":
        fused = _env_fused()
    if fused == "auto":
        return _auto_backend or "auto"
    return fused


def _on_meta(args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in args)


def _run(fn, fused: str, *args):
    """Run ``fn(*args)`` eagerly or compiled (same Python function, same numbers); ``fused`` is
    already normalized (one of ``FUSED_MODES``)."""
    global _auto_backend
    if fused == "auto":
        fused = _env_fused()
    if fused == "eager" or torch.compiler.is_compiling() or _tracing() or _on_meta(args):
        # Inside a user's torch.compile region the eager ops are traced and fused anyway; an
        # exporting tracer records the eager ops (compiling under it fails); meta tensors hold
        # no values (inductor cannot compile for them).
        return fn(*args)
    if fused == "compiled":
        return _get_compiled(fn, args)(*args)
    if _auto_backend == "eager":
        return fn(*args)
    try:
        out = _get_compiled(fn, args)(*args)
    except Exception as error:  # compiler missing, unsupported platform, ...
        if _auto_backend == "compiled":
            raise
        _auto_backend = "eager"
        warnings.warn(
            f"granq_ao: torch.compile is not usable here ({type(error).__name__}: {error}); "
            "using the eager fake-quant path (same numbers, slower). Set GRANQ_FUSED=eager to silence.",
            RuntimeWarning,
            stacklevel=3,
        )
        return fn(*args)
    _auto_backend = "compiled"
    return out


class _StraightThrough(torch.autograd.Function):
    """Forward: fake-quantize with given qparams. Backward: ``grad_x = grad_out`` (STE)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, q_min, q_max, fused):
        return _run(_fake_quantize_elementwise, fused, x.detach(), scale, zero_point, q_min, q_max)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None, None, None, None, None


class _DynamicStraightThrough(torch.autograd.Function):
    """Forward: ``_dynamic_fake_quantize`` -> (x_hat, x_min, x_max, all_finite). Backward:
    ``grad_x = grad_x_hat`` (STE); the ranges and the flag carry no gradient."""

    @staticmethod
    def forward(ctx, x, reduced, q_min, q_max, symmetric, fused):
        x_hat, x_min, x_max, all_finite, _, _ = _run(_dynamic_fake_quantize, fused, x.detach(),
                                                     reduced, q_min, q_max, symmetric)
        ctx.mark_non_differentiable(x_min, x_max, all_finite)
        return x_hat, x_min, x_max, all_finite

    @staticmethod
    def backward(ctx, grad_output, grad_min, grad_max, grad_flag):
        return grad_output, None, None, None, None, None


# ----------------------------------------------------------------------------- public ops
def fake_quantize_with_qparams(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                               q_min: int, q_max: int, fused: Any = "auto") -> torch.Tensor:
    """Fake-quantize ``x`` with given (broadcastable) qparams; straight-through gradient."""
    if x.numel() == 0:
        return x.clone()
    return _StraightThrough.apply(x, _to_compute(scale, x), _to_compute(zero_point, x), int(q_min), int(q_max),
                                  normalize_fused(fused))


def _config(bits: Union[int, GranQConfig], granularity: GranularityLike, axis: int, symmetric: bool,
            fused: Any, check_finite: bool) -> GranQConfig:
    """``bits`` itself when it is a GranQConfig (``ValueError`` if another argument differs from
    its default too), else the config the keywords describe (validated there)."""
    if isinstance(bits, GranQConfig):
        reject_options_with(bits, dict(granularity=granularity, axis=axis, symmetric=symmetric, fused=fused,
                                       check_finite=check_finite), _KEYWORD_DEFAULTS)
        return bits
    return GranQConfig(bits=bits, granularity=granularity, axis=axis, symmetric=symmetric, fused=fused,
                       check_finite=check_finite)


def fake_quantize(x: torch.Tensor, bits: Union[int, GranQConfig] = 4, granularity: GranularityLike = "granq",
                  axis: int = 1, symmetric: bool = False, fused: Any = "auto",
                  check_finite: bool = True) -> torch.Tensor:
    """Dynamic fake-quantization of ``x``: ranges from ``x`` itself (see the module docstring).

    Args:
        x: floating-point tensor, rank >= 2 (rank >= 1 for ``"tensor"``), any layout.
        bits: 2..8, or a :class:`~granq_ao.config.GranQConfig` holding every option below
            (giving one of them too is a ``ValueError``).
        granularity: ``"granq"`` (per (sample, channel), default), ``"channel"``, ``"tensor"``,
            ``"granq_iterative"`` or a granularity object.
        axis: the channel axis (default 1, NCHW).
        symmetric: symmetric signed grid instead of the paper's asymmetric one.
        fused: ``"auto"``, ``"compiled"`` or ``"eager"`` (same numbers).
        check_finite: raise :class:`NonFiniteInputError` on NaN/inf input (one check on the
            small range tensor, not on ``x``).

    Returns ``x_hat`` with ``x``'s shape, dtype and memory format. Gradient: straight-through.
    An empty batch returns an empty tensor.
    """
    return fake_quantize_dynamic(x, bits, granularity, axis, symmetric, fused, check_finite)[0]


def fake_quantize_dynamic(x: torch.Tensor, bits: Union[int, GranQConfig] = 4,
                          granularity: GranularityLike = "granq", axis: int = 1, symmetric: bool = False,
                          fused: Any = "auto", check_finite: bool = True
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fake_quantize` that also returns the ranges it used: ``(x_hat, x_min, x_max)``
    (float32, or float64 for float64 ``x``; keepdim). Ranges, qparams and the elementwise step run as one (compiled) function;
    the NaN/inf check reads the small range tensors afterwards."""
    config = _config(bits, granularity, axis, symmetric, fused, check_finite)
    granularity = config.granularity
    _check_input(x, granularity)
    reduced = _reduced_dims(granularity, x.dim())  # validates the axis even for empty input
    if x.numel() == 0:  # defined result for an empty batch: nothing to quantize, no ranges
        no_range = x.new_empty(0, dtype=_compute_dtype(x.dtype))
        return x.clone(), no_range, no_range
    if not reduced or config.iterative or _tracing():
        # Tracers (TorchScript ONNX export) record these plain ops; the fused Function is opaque to them.
        x_min, x_max = reduce_min_max(x.detach(), granularity, iterative=config.iterative)
        return (fake_quantize_from_ranges(x, x_min, x_max, config.bits, config.symmetric, config.fused,
                                          config.check_finite), x_min, x_max)
    x_hat, x_min, x_max, all_finite = _DynamicStraightThrough.apply(x, reduced, config.quant_min, config.quant_max,
                                                                    config.symmetric, config.fused)
    if config.check_finite:
        _raise_unless_finite(all_finite, x_min, x_max)
    return x_hat, x_min, x_max


_KEYWORD_DEFAULTS = keyword_defaults(fake_quantize_dynamic)  # read on each call with a GranQConfig: once here


def fake_quantize_from_ranges(x: torch.Tensor, x_min: torch.Tensor, x_max: torch.Tensor, bits: int,
                              symmetric: bool = False, fused: Any = "auto",
                              check_finite: bool = True) -> torch.Tensor:
    """Fake-quantize ``x`` with ranges already reduced from it (by :func:`reduce_min_max`):
    ``compute_qparams`` then the elementwise step. Straight-through gradient."""
    q_min, q_max = quant_range(bits, symmetric)
    if x.numel() == 0:
        return x.clone()
    if check_finite:
        check_finite_ranges(x_min, x_max, symmetric)
    scale, zero_point = compute_qparams(x_min, x_max, bits, symmetric)
    return fake_quantize_with_qparams(x, scale, zero_point, q_min, q_max, fused)


def qparams_for_layout(scale: torch.Tensor, zero_point: torch.Tensor, y: torch.Tensor,
                       granularity: GranularityLike = "granq", axis: int = 1
                       ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The qparams of a source tensor, viewed for ``y``, where ``y`` keeps the source's layout.

    ``scale``/``zero_point`` are keepdim qparams of a source of rank ``scale.dim()`` (GranQ:
    ``(N, C, 1, ..)``). ``y`` keeps the layout when every dim the granularity keeps on the source
    has the same size at the same position in ``y`` (GranQ: ``y.shape[:2] == (N, C)``: max/avg
    pooling, ReLU6, a flatten of ``(N, C, 1, 1)``); then each element of ``y`` gets the qparams of
    its ``(n, c)``: returned viewed to ``y``'s rank. Otherwise (a flatten of ``(N, C, H, W)``,
    a permute moving channels) ``None``. Per-tensor qparams fit any ``y``."""
    granularity = as_granularity(granularity, axis)
    kept = granularity.kept_dims(scale.dim()) if scale.dim() else ()
    if any(d >= y.dim() or y.shape[d] != scale.shape[d] for d in kept):
        return None
    shape = [y.shape[d] if d in kept else 1 for d in range(y.dim())]
    return scale.reshape(shape), zero_point.reshape(shape)


def fake_quantize_shared(y: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                         config: GranQConfig) -> torch.Tensor:
    """A shared quantizer's later application: ``y`` (a range-preserving op's output, e.g.
    ReLU6 / pooling / flatten of an already fake-quantized value) fake-quantized with the qparams
    the first application computed (``scale``, ``zero_point``, from its own input), where ``y``
    keeps that input's layout (:func:`qparams_for_layout`); ``y`` unchanged otherwise: a
    layout-changing op such as flatten only moves values that already sit on their (n, c)'s
    grid, so re-quantizing each with its own (n, c)'s qparams would return it unchanged.
    Straight-through gradient."""
    qparams = qparams_for_layout(scale, zero_point, y, config.granularity)
    if qparams is None:
        return y
    return fake_quantize_with_qparams(y, qparams[0], qparams[1], config.quant_min, config.quant_max, config.fused)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
             symmetric: bool = False) -> torch.Tensor:
    """Integer codes ``x_q = clamp(round(x / s + z), q_min, q_max)`` as uint8 (asymmetric) or
    int8 (symmetric). Where ``s == 0`` the code is ``z`` (``dequantize`` then restores nothing:
    use :func:`fake_quantize` semantics via ``dequantize(..., passthrough=x)``)."""
    q_min, q_max = quant_range(bits, symmetric)
    x_q = _codes(_to_compute(x), _safe_scale(_to_compute(scale, x)), _to_compute(zero_point, x), q_min, q_max)
    return x_q.to(torch.int8 if symmetric else torch.uint8)


def dequantize(x_q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               passthrough: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """``x_hat = (x_q - z) * s``; where ``s == 0`` the value of ``passthrough`` (the original
    input) is returned, which makes ``dequantize(quantize(x))`` equal ``fake_quantize(x)``."""
    compute = _compute_dtype(dtype)
    scale = scale.to(compute)
    x_hat = (x_q.to(compute) - zero_point.to(compute)) * _safe_scale(scale)
    if passthrough is not None:
        x_hat = torch.where(scale > 0, x_hat, passthrough.to(compute))
    return x_hat.to(dtype)
