"""granq_ao.functional against an independent NumPy float32 reference written here.

The reference loops over the slices that own a range (one per tensor, per channel, or per
(sample, channel)) and applies DESIGN §1 literally in NumPy float32 (``np.round`` rounds half
to even, like ``torch.round``), so the eager path must match it bit for bit.
"""
import itertools
import warnings

import numpy as np
import pytest
import torch

from granq_ao import functional as F
from granq_ao.functional import NonFiniteInputError
from granq_ao.granularity import PerSampleChannel

GRANULARITIES = ("tensor", "channel", "granq", "granq_iterative")


# ----------------------------------------------------------------------------- reference
def ref_slice(values: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    """DESIGN §1 on one slice that shares a range, in float32."""
    values = values.astype(np.float32)
    lo, hi = np.float32(values.min()), np.float32(values.max())
    if symmetric:
        q_min, q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        s = np.float32(max(abs(lo), abs(hi))) / np.float32((2**bits - 1) / 2)
        z = np.float32(0)
    else:
        q_min, q_max = 0, 2**bits - 1
        s = (hi - lo) / np.float32(2**bits - 1)
        z = np.round(-lo / s) if s > 0 else np.float32(0)
    if s == 0:
        return values.copy()  # empty range: unchanged
    x_q = np.clip(np.round(values / s + z), q_min, q_max).astype(np.float32)
    return ((x_q - z) * s).astype(np.float32)


def reference(x: torch.Tensor, bits: int, granularity: str, axis: int = 1,
              symmetric: bool = False) -> torch.Tensor:
    """Loop over the index tuples of the kept dims and quantize each slice on its own."""
    a = x.detach().float().numpy()
    out = np.empty_like(a)
    ndim = a.ndim
    if granularity == "tensor":
        kept = ()
    elif granularity == "channel":
        kept = (axis % ndim,)
    elif ndim == 2:  # granq on (N, F): one range per sample
        kept = (0,)
    else:
        kept = (0, axis % ndim)
    for index in itertools.product(*[range(a.shape[d]) for d in kept]):
        where = [slice(None)] * ndim
        for d, i in zip(kept, index):
            where[d] = i
        out[tuple(where)] = ref_slice(a[tuple(where)], bits, symmetric)
    return torch.from_numpy(out)


def sample(shape, seed=0, dtype=torch.float32):
    """Random values with a different offset and spread per (sample, channel) along dims 0/1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if len(shape) >= 2:
        spread = torch.rand(shape[:2], generator=g) * 3 + 0.1
        offset = torch.randn(shape[:2], generator=g)
        x = x * spread.reshape(*shape[:2], *[1] * (len(shape) - 2)) + offset.reshape(
            *shape[:2], *[1] * (len(shape) - 2))
    return x.to(dtype)


SHAPES = {2: (3, 7), 3: (3, 4, 6), 4: (2, 3, 4, 5), 5: (2, 3, 2, 3, 4)}


# ----------------------------------------------------------------------------- numbers
@pytest.mark.numerics
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_matches_independent_reference(granularity, rank, axis, bits, symmetric):
    x = sample(SHAPES[rank], seed=rank * 10 + bits)
    y = F.fake_quantize(x, bits, granularity, axis=axis, symmetric=symmetric, fused=False)
    expected = reference(x, bits, granularity, axis, symmetric)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert torch.equal(y, expected)


def test_tensor_granularity_rank_1_and_0():
    x = sample((11,))
    assert torch.equal(F.fake_quantize(x, 3, "tensor", fused=False), reference(x, 3, "tensor"))
    scalar = torch.tensor(1.5)
    assert torch.equal(F.fake_quantize(scalar, 3, "tensor", fused=False), scalar)  # constant


def test_granularities_really_differ():
    """Guards the reference itself: the four granularities give different numbers (rank 4)."""
    x = sample((2, 3, 4, 5))
    outs = {g: F.fake_quantize(x, 3, g, fused=False) for g in ("tensor", "channel", "granq")}
    assert not torch.equal(outs["tensor"], outs["channel"])
    assert not torch.equal(outs["channel"], outs["granq"])


def test_rounding_ties_are_half_to_even():
    # One slice, range [0, 15] at 4 bits: s = 1, z = 0; x = k + 0.5 sits exactly on a tie.
    x = torch.tensor([[0.0, 15.0, 0.5, 1.5, 2.5, 13.5, 14.5]])
    y = F.fake_quantize(x, 4, "granq", fused=False)
    assert y.tolist() == [[0.0, 15.0, 0.0, 2.0, 2.0, 14.0, 14.0]]


@pytest.mark.numerics
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_granq_iterative_is_bit_exact_granq(rank):
    x = sample(SHAPES[rank], seed=rank)
    for axis in (1, -1):
        fast = F.fake_quantize(x, 3, "granq", axis=axis, fused=False)
        loop = F.fake_quantize(x, 3, "granq_iterative", axis=axis, fused=False)
        assert torch.equal(fast, loop)
        assert all(torch.equal(a, b) for a, b in zip(
            F.reduce_min_max(x, "granq", axis), F.reduce_min_max(x, "granq_iterative", axis)))


def test_reduce_min_max_shapes_rank_2_is_per_row_not_per_tensor():
    x = sample((3, 7))
    x_min, x_max = F.reduce_min_max(x, "granq")
    assert x_min.shape == (3, 1)
    assert torch.equal(x_min.flatten(), x.amin(dim=1)) and torch.equal(x_max.flatten(), x.amax(dim=1))
    assert F.reduce_min_max(x, "channel", axis=1)[0].shape == (1, 7)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gradient_is_straight_through(granularity, dtype):
    x = sample((2, 3, 4, 4), dtype=dtype).requires_grad_()
    upstream = sample((2, 3, 4, 4), seed=7, dtype=dtype)
    F.fake_quantize(x, 2, granularity, fused=False).backward(upstream)
    assert x.grad.dtype == dtype
    assert torch.equal(x.grad, upstream)


def test_quantize_dequantize_round_trip_equals_fake_quantize():
    for symmetric in (False, True):
        x = sample((2, 3, 4, 5))
        x[1, 2] = 0.75  # a constant slice: s == 0 (asymmetric) -> passthrough
        x[0, 1] = 0.0  # all zeros: s == 0 in both conventions
        x_min, x_max = F.reduce_min_max(x, "granq")
        scale, zero_point = F.compute_qparams(x_min, x_max, 3, symmetric)
        codes = F.quantize(x, scale, zero_point, 3, symmetric)
        q_min, q_max = F.quant_range(3, symmetric)
        assert codes.dtype == (torch.int8 if symmetric else torch.uint8)
        assert int(codes.min()) >= q_min and int(codes.max()) <= q_max
        x_hat = F.dequantize(codes, scale, zero_point, passthrough=x)
        assert torch.equal(x_hat, F.fake_quantize(x, 3, "granq", symmetric=symmetric, fused=False))


def test_quant_range():
    assert F.quant_range(4) == (0, 15)
    assert F.quant_range(4, symmetric=True) == (-8, 7)
    assert F.quant_range(2) == (0, 3) and F.quant_range(8) == (0, 255)


# ----------------------------------------------------------------------------- fused path
@pytest.mark.numerics
def test_compiled_equals_eager_bit_identical():
    """Three compiles of one function (the first costs ~20 s on CPU; each dtype or rank change
    recompiles): fp32 with exact ties, a constant and a random slice; fp16 symmetric; bf16
    channels_last rank 4."""
    ties = torch.arange(0, 15.5, 0.5).repeat(2, 1).reshape(2, 1, 31)  # s = 1: every x.5 a tie
    x = torch.cat([ties, torch.full((2, 1, 31), 4.0), sample((2, 2, 31), seed=3)], dim=1)
    cases = [
        (x, False),
        (sample((2, 3, 31), seed=5, dtype=torch.float16), True),
        (sample((3, 5, 4, 6), seed=6, dtype=torch.bfloat16).to(memory_format=torch.channels_last), False),
    ]
    for x, symmetric in cases:
        eager = F.fake_quantize(x, 4, "granq", symmetric=symmetric, fused=False)
        compiled = F.fake_quantize(x, 4, "granq", symmetric=symmetric, fused=True)
        assert compiled.dtype == x.dtype
        assert torch.equal(eager, compiled), (x.shape, x.dtype, symmetric)
    assert torch.equal(eager, reference(x.float(), 4, "granq").to(torch.bfloat16))
    assert F.fused_backend(True) == "compiled" and F.fused_backend(False) == "eager"


@pytest.mark.parametrize("value, expected", [
    ("", "auto"), ("auto", "auto"), ("AUTO", "auto"), ("1", "compiled"), ("compiled", "compiled"),
    (" compiled ", "compiled"), ("0", "eager"), ("eager", "eager"),
])
def test_granq_fused_env_parsing(monkeypatch, value, expected):
    monkeypatch.setenv("GRANQ_FUSED", value)
    assert F._env_fused() == expected
    if expected != "auto":
        assert F.fused_backend() == expected
    assert F.fused_backend("eager") == "eager"  # the argument wins over the environment
    assert F.fused_backend(False) == "eager"  # legacy spelling of the argument


@pytest.mark.parametrize("value", ["true", "on", "off", "yes"])
def test_granq_fused_env_has_one_vocabulary(monkeypatch, value):
    monkeypatch.setenv("GRANQ_FUSED", value)
    with pytest.raises(ValueError, match="GRANQ_FUSED must be one of auto, compiled, eager"):
        F.fused_backend()


def test_granq_fused_env_bad_value(monkeypatch):
    monkeypatch.setenv("GRANQ_FUSED", "maybe")
    with pytest.raises(ValueError, match="GRANQ_FUSED"):
        F.fake_quantize(sample((2, 3, 4)), 4)


def test_granq_fused_env_zero_takes_eager_path(monkeypatch):
    monkeypatch.setenv("GRANQ_FUSED", "0")
    x = sample((2, 3, 4))
    assert torch.equal(F.fake_quantize(x, 4), reference(x, 4, "granq"))
    assert F.fused_backend() == "eager"


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_non_finite_input_raises(granularity, bad):
    x = sample((2, 3, 4, 4))
    x[1, 2, 3, 0] = bad
    with pytest.raises(NonFiniteInputError, match="NaN or infinite"):
        F.fake_quantize(x, 4, granularity, fused=False)
    # the check can be turned off: then values are the caller's problem
    F.fake_quantize(x, 4, granularity, fused=False, check_finite=False)


@pytest.mark.parametrize("granularity", ["channel", "granq", "granq_iterative"])
def test_constant_slices_pass_through_exactly(granularity):
    x = sample((2, 3, 4, 4))
    x[:, 1] = 2.3125  # channel 1 constant over batch and space
    x[:, 2] = -0.3
    y = F.fake_quantize(x, 3, granularity, fused=False)
    assert torch.equal(y[:, 1], x[:, 1]) and torch.equal(y[:, 2], x[:, 2])
    assert not torch.equal(y[:, 0], x[:, 0])  # the others are quantized
    const = torch.full((2, 3, 4), -1.7)
    assert torch.equal(F.fake_quantize(const, 3, "tensor", fused=False), const)
    zeros = torch.zeros(2, 3, 4)
    assert torch.equal(F.fake_quantize(zeros, 3, granularity, symmetric=True, fused=False), zeros)


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("constant_channel", [False, True])
def test_elementwise_step_equals_the_select_formula_bit_for_bit(dtype, constant_channel):
    """With every range non-empty the eager step skips its final select (a full-size pass); with
    an empty range it keeps it. Both must give the bits of the explicit formula
    ``where(s > 0, (clamp(round(x / s + z), 0, 7) - z) * s, x)``."""
    x = sample((4, 5, 6, 6), seed=3, dtype=dtype)
    if constant_channel:
        x[:, 2] = 0.75
    xf = x.to(torch.float64 if dtype == torch.float64 else torch.float32)
    x_min, x_max = xf.amin(dim=(2, 3), keepdim=True), xf.amax(dim=(2, 3), keepdim=True)
    scale, zero_point = F.compute_qparams(x_min, x_max, 3)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(xf / safe + zero_point), 0, 7)
    expected = torch.where(scale > 0, (codes - zero_point) * safe, xf).to(dtype)
    got = F.fake_quantize(x, 3, "granq", fused="eager")
    assert got.dtype == dtype and torch.equal(got, expected)
    assert torch.equal(got[:, 2], x[:, 2]) == constant_channel


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_empty_batch(granularity):
    x = torch.empty(0, 3, 4, 4, requires_grad=True)
    y = F.fake_quantize(x, 4, granularity, fused=False)
    assert y.shape == (0, 3, 4, 4) and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_reduce_min_max_of_empty_batch_is_zero_ranges(granularity):
    x_min, x_max = F.reduce_min_max(torch.empty(0, 3, 4, 4), granularity)
    want = (1, 1, 1, 1) if granularity == "tensor" else (0, 3, 1, 1) if "granq" in granularity else (1, 3, 1, 1)
    assert x_min.shape == x_max.shape == want and x_min.dtype == torch.float32
    assert not x_min.any() and not x_max.any()


def test_reduce_min_max_check_finite():
    x = sample((2, 3, 4, 5))
    assert all(torch.equal(a, b) for a, b in zip(F.reduce_min_max(x, check_finite=True), F.reduce_min_max(x)))
    x[1, 0, 0, 0] = float("inf")
    assert torch.isinf(F.reduce_min_max(x)[1]).any()  # off by default: ranges hold inf
    with pytest.raises(NonFiniteInputError):
        F.reduce_min_max(x, check_finite=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_half_precision_computed_in_fp32(dtype, granularity):
    x = sample((2, 3, 4, 5), dtype=dtype)
    y = F.fake_quantize(x, 4, granularity, fused=False)
    assert y.dtype == dtype
    assert torch.equal(y, reference(x.float(), 4, granularity).to(dtype))


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_layouts_give_the_contiguous_result(granularity):
    x = sample((2, 3, 5, 6))
    expected = F.fake_quantize(x, 3, granularity, fused=False)
    channels_last = x.to(memory_format=torch.channels_last)
    y = F.fake_quantize(channels_last, 3, granularity, fused=False)
    assert torch.equal(y, expected)
    assert y.is_contiguous(memory_format=torch.channels_last)  # layout kept
    big = sample((2, 3, 6, 10))
    strided = big[:, :, ::2, 1:7]  # non-contiguous view
    assert not strided.is_contiguous()
    assert torch.equal(F.fake_quantize(strided, 3, granularity, fused=False),
                       F.fake_quantize(strided.contiguous(), 3, granularity, fused=False))
    transposed = sample((2, 5, 6, 3)).permute(0, 3, 1, 2)  # NHWC storage seen as NCHW
    assert torch.equal(F.fake_quantize(transposed, 3, granularity, fused=False),
                       F.fake_quantize(transposed.contiguous(), 3, granularity, fused=False))


@pytest.mark.parametrize("granularity", ["channel", "granq", "granq_iterative"])
def test_rank_below_2_is_rejected(granularity):
    with pytest.raises(ValueError, match="rank >= 2"):
        F.fake_quantize(torch.randn(5), 4, granularity, fused=False)
    with pytest.raises(ValueError, match="rank >= 2"):
        F.fake_quantize(torch.empty(0), 4, granularity, fused=False)


@pytest.mark.parametrize("granularity", ["channel", "granq"])
@pytest.mark.parametrize("shape, axis", [((2, 3), 2), ((2, 3), -3), ((2, 3, 4, 4), 4),
                                         ((2, 3, 4, 4), -5), ((0, 3, 4, 4), 7)])
def test_bad_channel_axis_is_rejected(granularity, shape, axis):
    with pytest.raises(ValueError, match="out of range"):
        F.fake_quantize(torch.randn(shape), 4, granularity, axis=axis, fused=False)


def test_granq_channel_axis_equal_to_batch_axis_is_rejected():
    with pytest.raises(ValueError, match="different from the batch axis"):
        F.fake_quantize(torch.randn(2, 3, 4), 4, PerSampleChannel(axis=0), fused=False)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0, True, "4", None])
def test_bits_outside_2_to_8_are_rejected(bits):
    with pytest.raises(ValueError, match="bits"):
        F.fake_quantize(torch.randn(2, 3), bits, fused=False)
    with pytest.raises(ValueError, match="bits"):
        F.quant_range(bits)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_tensors_are_rejected(dtype):
    with pytest.raises(TypeError, match="floating-point"):
        F.fake_quantize(torch.zeros(2, 3, dtype=dtype), 4, fused=False)
    with pytest.raises(TypeError, match="floating-point"):
        F.fake_quantize(torch.zeros(0, 3, dtype=dtype), 4, fused=False)


def test_unknown_granularity_is_rejected():
    with pytest.raises(ValueError, match="granularity must be one of granq, channel, tensor, granq_iterative"):
        F.fake_quantize(torch.randn(2, 3), 4, "per_token", fused=False)


def test_each_input_pattern_compiles_its_own_code_object(monkeypatch):
    """torch._dynamo's recompile limit (8) counts per code object: every pattern gets a copy of
    the function's code, so many patterns in one process never push later ones to eager."""
    compiled = []

    def fake_compile(fn, dynamic):
        compiled.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(F, "_compiled", {})
    fn = F._dynamic_fake_quantize
    a, b = torch.randn(2, 3, 4, 4), torch.randn(5, 3, 6, 6)  # same pattern, other sizes
    patterns = [(a, (2, 3), 0, 15, False), (b, (2, 3), 0, 15, False), (a, (2, 3), 0, 7, False),
                (a.double(), (2, 3), 0, 15, False), (torch.randn(2, 3), (1,), 0, 15, False)]
    for args in patterns:
        out = F._get_compiled(fn, args)(*args)
        assert torch.equal(out[0], fn(*args)[0])  # the copy computes what the original does
    assert len(compiled) == 4  # a and b share one
    codes = [c.__code__ for c in compiled]
    assert len({id(code) for code in codes}) == 4 and all(code is not fn.__code__ for code in codes)
    assert all(code == fn.__code__ for code in codes)  # copies, not other code


def test_tracing_records_the_eager_ops_without_compiling_or_warning(monkeypatch):
    """Under an exporting tracer (torch.jit.trace, the TorchScript ONNX exporter) the auto path
    does not try torch.compile, and the host-side finite check (not part of a traced graph) is
    not applied."""
    def no_compile(fn, args):
        raise AssertionError("torch.compile attempted under a tracer")

    monkeypatch.delenv("GRANQ_FUSED", raising=False)
    monkeypatch.setattr(F, "_get_compiled", no_compile)
    monkeypatch.setattr(F, "_auto_backend", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks such as numel()
        traced = torch.jit.trace(lambda x: F.fake_quantize(x, 4), sample((2, 3, 4, 5)),
                                 check_trace=False)  # (the check re-runs it untraced)
        nan = torch.tensor([[float("nan"), 1.0]])
        torch.jit.trace(lambda x: (F.check_finite_ranges(x, x), x + 1)[1], nan,
                        check_trace=False)  # no error while tracing
    with pytest.raises(NonFiniteInputError):
        F.check_finite_ranges(nan, nan)  # eager: still refused
    assert F._auto_backend is None  # nothing decided by the trace
    other = sample((3, 3, 4, 5), seed=7)  # ranges are traced ops: recomputed from the new input
    assert torch.equal(traced(other), reference(other, 4, "granq"))


# ----------------------------------------------------------------------------- compile fallback
def test_auto_falls_back_to_eager_when_compiling_fails(monkeypatch):
    """Auto mode: a compiler failure warns once, switches to eager (same numbers) and says so;
    fused=True never hides the failure."""
    def broken_compile(fn, args):
        def call(*args):
            raise RuntimeError("no C++ compiler")
        return call

    monkeypatch.delenv("GRANQ_FUSED", raising=False)
    monkeypatch.setattr(F, "_get_compiled", broken_compile)
    monkeypatch.setattr(F, "_auto_backend", None)
    x = torch.randn(4, 3, 5, 5)
    with pytest.warns(RuntimeWarning, match="torch.compile is not usable here"):
        out = F.fake_quantize(x, 3, fused=None)
    assert F.fused_backend() == "eager"
    assert torch.equal(out, F.fake_quantize(x, 3, fused=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        F.fake_quantize(x, 3, fused=None)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        F.fake_quantize(x, 3, fused=True)
