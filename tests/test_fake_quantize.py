"""GranQFakeQuantize / GranQObserver against the torch.ao contracts (DESIGN §3) and bad input."""
import pytest
import torch
import torch.nn as nn
from torch.ao.quantization import (
    disable_fake_quant,
    disable_observer,
    enable_fake_quant,
    enable_observer,
)
from torch.ao.quantization.quantize_fx import prepare_qat_fx as torch_prepare_qat_fx

import granq_ao
from granq_ao import functional as F
from granq_ao.integrations.torch_ao.fake_quantize import GranQFakeQuantize
from granq_ao.functional import NonFiniteInputError
from granq_ao.integrations.torch_ao.observer import GranQObserver


def make(**kwargs):
    kwargs.setdefault("fused", False)
    return GranQFakeQuantize(**kwargs)


def batches(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * (i + 1) + i * 0.3 for i, shape in enumerate(shapes)]


def running(values, a):
    """The observer's documented moving average, written out: first value, then r += a * (v - r)."""
    r = values[0].clone()
    for v in values[1:]:
        r = r + a * (v - r)
    return r


def per_channel_min_max(x, axis=1):
    """Per-channel min/max by moving the channel to the front and flattening the rest."""
    flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    return flat.min(dim=1).values, flat.max(dim=1).values


def static_qparams(lo, hi, bits, symmetric=False, eps=torch.finfo(torch.float32).eps, signed=False):
    """Static qparams from running ranges widened to include 0, on the unsigned grid
    [0, 2^b - 1] (quint8 label) or the signed grid [-2^(b-1), 2^(b-1) - 1] (qint8 label)."""
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / ((2**bits - 1) / 2)
        zero_point = torch.full_like(scale, 2 ** (bits - 1))
    else:
        scale = (hi - lo) / (2**bits - 1)
        zero_point = torch.round(-lo / scale)
    if signed:
        zero_point = zero_point - 2 ** (bits - 1)
    return torch.clamp(scale, min=eps), zero_point.to(torch.int64)


# ----------------------------------------------------------------------------- construction
def test_with_args_builds_configured_modules():
    factory = GranQFakeQuantize.with_args(bits=3, granularity="channel", ch_axis=0, symmetric=True,
                                          fused=False, dtype=torch.qint8, averaging_constant=0.5)
    a, b = factory(), factory()
    assert a is not b
    assert (a.bits, a.granularity.name, a.ch_axis, a.symmetric, a.dtype) == (3, "channel", 0, True, torch.qint8)
    assert a.activation_post_process.averaging_constant == 0.5
    assert (a.quant_min, a.quant_max) == (-4, 3)  # qint8 label: signed grid


def test_torch_style_quant_range_gives_bits():
    assert GranQFakeQuantize(quant_min=0, quant_max=7).bits == 3
    signed = GranQFakeQuantize(quant_min=-8, quant_max=7)
    assert signed.bits == 4 and signed.dtype == torch.qint8 and not signed.symmetric
    with pytest.raises(ValueError, match="do not match"):
        GranQFakeQuantize(quant_min=-8, quant_max=7, dtype=torch.quint8, bits=4)


def test_signed_weight_grid_gives_same_dequantized_static_values():
    """qint8-labelled (signed grid) static qparams dequantize like the unsigned ones."""
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3)
    weight_fq = GranQFakeQuantize(bits=4, granularity="channel", ch_axis=0, dtype=torch.qint8,
                                  averaging_constant=1.0, fused=False)
    weight_fq(w)
    scale, zero_point = weight_fq.calculate_qparams()
    lo, hi = per_channel_min_max(w, axis=0)
    ref_scale, ref_zero_point = static_qparams(lo, hi, 4, signed=True)
    assert torch.equal(scale, ref_scale) and torch.equal(zero_point, ref_zero_point)
    assert int(zero_point.min()) >= -8 and int(zero_point.max()) <= 7
    q = torch.quantize_per_channel(w, scale.double(), zero_point, 0, torch.qint8)
    unsigned = torch.quantize_per_channel(w, scale.double(), zero_point + 8, 0, torch.quint8)
    assert torch.equal(q.dequantize(), unsigned.dequantize())


def test_config_with_conflicting_keywords_is_refused():
    """A GranQConfig holds bits, granularity, axis, symmetric, fused and check_finite: giving one of
    them too would be ignored silently, so the module and the functional op refuse the mix."""
    config = granq_ao.GranQConfig(bits=3, granularity="channel")
    with pytest.raises(ValueError, match=r"both a GranQConfig and the keyword option\(s\) bits, ch_axis: "):
        GranQFakeQuantize(config=config, bits=4, ch_axis=0)
    with pytest.raises(ValueError, match=r"keyword option\(s\) granularity: "):
        GranQFakeQuantize.with_args(config=config, granularity="tensor")()
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"keyword option\(s\) symmetric: "):
        F.fake_quantize(x, config, symmetric=True)
    with pytest.raises(ValueError, match=r"keyword option\(s\) axis, check_finite: "):
        F.fake_quantize_dynamic(x, config, axis=0, check_finite=False)
    module = GranQFakeQuantize(config=config, fused=None, quant_min=0, quant_max=7, averaging_constant=0.5)
    assert module.config is config and module.activation_post_process.averaging_constant == 0.5
    assert torch.equal(F.fake_quantize(x, config, "granq", fused=None), F.fake_quantize(x, 3, "channel"))


@pytest.mark.parametrize("bits", [1, 9, 0, 2.5, True])
def test_bits_outside_2_to_8_rejected_at_construction(bits):
    with pytest.raises(ValueError, match="bits"):
        GranQFakeQuantize(bits=bits)
    with pytest.raises(ValueError, match="bits"):
        GranQFakeQuantize.with_args(bits=bits)()


def test_attributes_fx_reads():
    fq = make(bits=4)
    observer = fq.activation_post_process
    assert isinstance(observer, GranQObserver)
    assert (observer.quant_min, observer.quant_max) == (0, 15)
    assert observer.eps.numel() == 1 and float(observer.eps) > 0
    assert fq.dtype == torch.quint8 and fq.is_dynamic is False
    assert fq.ch_axis == 1 and (fq.quant_min, fq.quant_max) == (0, 15)
    assert fq.qscheme == torch.per_channel_affine
    assert make(bits=4, symmetric=True).qscheme == torch.per_channel_symmetric
    assert make(bits=4, granularity="tensor").qscheme == torch.per_tensor_affine
    assert make(bits=4, granularity="tensor", symmetric=True).qscheme == torch.per_tensor_symmetric


def test_extra_repr():
    text = repr(make(bits=3, granularity="channel", symmetric=True))
    for part in ("bits=3", "granularity=channel", "ch_axis=1", "symmetric=True",
                 "fake_quant_enabled=True", "observer_enabled=True", "backend=eager", "GranQObserver"):
        assert part in text
    kernel = make(bits=3, granularity=granq_ao.PerSampleChannel(axis=1), ch_axis=0)
    assert "granularity=kernel, ch_axis=0" in repr(kernel)  # per (out, in) slice of a weight
    other_axis = make(bits=3, granularity=granq_ao.PerSampleChannel(axis=2), ch_axis=1)
    assert "granularity=granq(axis=2), ch_axis=1" in repr(other_axis)


# ----------------------------------------------------------------------------- forward numbers
@pytest.mark.numerics
@pytest.mark.parametrize("granularity", ["granq", "channel", "tensor", "granq_iterative"])
def test_forward_is_functional_fake_quantize(granularity):
    x = batches([(3, 4, 5, 5)])[0].requires_grad_()
    fq = make(bits=3, granularity=granularity)
    y = fq(x)
    assert torch.equal(y, F.fake_quantize(x.detach(), 3, granularity, fused=False))
    upstream = torch.randn_like(x)
    y.backward(upstream)
    assert torch.equal(x.grad, upstream)  # straight-through


def test_kernel_weight_granularity_on_a_weight():
    """granularity per (out, in) slice with ch_axis 0: ranges per kernel slice, observer per
    output channel (static weight export)."""
    weight = torch.randn(4, 3, 3, 3)
    fq = make(bits=3, granularity=granq_ao.PerSampleChannel(axis=1), ch_axis=0, dtype=torch.qint8,
              averaging_constant=1.0)
    y = fq(weight)
    for o in range(4):
        for i in range(3):
            assert torch.equal(y[o, i], F.fake_quantize(weight[o, i].reshape(1, -1), 3, "granq", fused=False)
                               .reshape(3, 3))
    lo, hi = per_channel_min_max(weight, axis=0)
    assert torch.equal(fq.activation_post_process.min_val, lo)
    assert torch.equal(fq.activation_post_process.max_val, hi)


# ----------------------------------------------------------------------------- enable / disable
def test_enable_disable_through_torch_ao_apply():
    model = nn.Sequential(nn.Identity(), make(bits=2, averaging_constant=0.5))
    fq = model[1]
    x, x2 = batches([(2, 3, 4, 4), (2, 3, 4, 4)])
    quantized = model(x)
    assert not torch.equal(quantized, x)
    min_after_first = fq.activation_post_process.min_val.clone()

    model.apply(disable_fake_quant)
    assert int(fq.fake_quant_enabled[0]) == 0
    assert model(x2) is x2  # identity, still observing
    assert not torch.equal(fq.activation_post_process.min_val, min_after_first)

    model.apply(disable_observer)
    frozen = fq.activation_post_process.min_val.clone()
    x5 = x * 5
    assert model(x5) is x5  # fake-quant and observer off: identity
    assert torch.equal(fq.activation_post_process.min_val, frozen)
    assert int(fq.observer_enabled[0]) == 0

    model.apply(enable_fake_quant)
    assert torch.equal(model(x), quantized)  # dynamic ranges: same input, same output
    assert torch.equal(fq.activation_post_process.min_val, frozen)  # observer still off
    model.apply(enable_observer)
    model(x)
    assert not torch.equal(fq.activation_post_process.min_val, frozen)
    assert "fake_quant_enabled=True, observer_enabled=True" in repr(fq)


def test_observer_alone_records_without_quantizing():
    fq = make(bits=2)
    fq.disable_fake_quant()
    x = batches([(2, 3, 4, 4)])[0]
    assert fq(x) is x
    lo, hi = per_channel_min_max(x)
    assert torch.equal(fq.activation_post_process.min_val, lo)
    assert torch.equal(fq.activation_post_process.max_val, hi)


# ----------------------------------------------------------------------------- static qparams
@pytest.mark.parametrize("granularity", ["granq", "channel", "granq_iterative"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_calculate_qparams_from_running_ranges(granularity, symmetric):
    a = 0.25
    fq = make(bits=4, granularity=granularity, symmetric=symmetric, averaging_constant=a)
    xs = batches([(2, 3, 4, 4)] * 4)
    for x in xs:
        fq(x)
    lo = running([per_channel_min_max(x)[0] for x in xs], a)
    hi = running([per_channel_min_max(x)[1] for x in xs], a)
    observer = fq.activation_post_process
    assert torch.allclose(observer.min_val, lo, rtol=0, atol=1e-6)
    assert torch.allclose(observer.max_val, hi, rtol=0, atol=1e-6)
    scale, zero_point = fq.calculate_qparams()
    want_scale, want_zero_point = static_qparams(lo, hi, 4, symmetric)
    assert scale.shape == (3,) and zero_point.dtype == torch.int64
    assert torch.allclose(scale, want_scale, rtol=1e-6, atol=0)
    assert torch.equal(zero_point, want_zero_point)
    assert int(zero_point.min()) >= 0 and int(zero_point.max()) <= 15


def test_calculate_qparams_per_tensor_granularity():
    a = 0.5
    fq = make(bits=3, granularity="tensor", averaging_constant=a)
    xs = batches([(2, 3, 4, 4)] * 3)
    for x in xs:
        fq(x)
    lo = running([x.min() for x in xs], a)
    hi = running([x.max() for x in xs], a)
    scale, zero_point = fq.calculate_qparams()
    want_scale, want_zero_point = static_qparams(lo, hi, 3)
    assert scale.numel() == 1 and torch.allclose(scale, want_scale, rtol=1e-6, atol=0)
    assert torch.equal(zero_point.reshape(()), want_zero_point)
    assert fq.qscheme == torch.per_tensor_affine


def test_calculate_qparams_before_any_batch_is_valid():
    scale, zero_point = make(bits=4).calculate_qparams()
    assert float(scale.min()) > 0 and int(zero_point.max()) == 0


@pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions")
def test_shared_instance_falls_back_to_per_tensor():
    """FX shares one instance between an op and the flatten/view after it."""
    a = 0.5
    fq = make(bits=4, averaging_constant=a)
    x4 = batches([(2, 3, 4, 4)])[0]
    x2 = batches([(2, 48)], seed=1)[0] * 3
    fq(x4)
    assert not fq.activation_post_process.channel_mismatch
    assert fq.qscheme == torch.per_channel_affine
    y2 = fq(x2)
    assert torch.equal(y2, F.fake_quantize(x2, 4, "granq", fused=False))  # per row
    observer = fq.activation_post_process
    assert observer.channel_mismatch and fq.qscheme == torch.per_tensor_affine
    lo = running([x4.min(), x2.min()], a)
    hi = running([x4.max(), x2.max()], a)
    scale, zero_point = fq.calculate_qparams()
    want_scale, want_zero_point = static_qparams(lo, hi, 4)
    assert scale.numel() == 1 and torch.allclose(scale, want_scale, rtol=1e-6, atol=0)
    assert torch.equal(zero_point.reshape(()), want_zero_point)
    # valid static qparams for either shape
    for x in (x4, x2):
        torch.quantize_per_tensor(x, float(scale), int(zero_point), torch.quint8)


# ----------------------------------------------------------------------------- state dict
def test_state_dict_round_trip_into_fresh_module():
    fq = make(bits=3, averaging_constant=0.5)
    for x in batches([(2, 5, 4, 4)] * 2):
        fq(x)
    fq.disable_observer()
    state = fq.state_dict()
    fresh = make(bits=3, averaging_constant=0.5)
    assert fresh.activation_post_process.min_val.numel() == 0
    fresh.load_state_dict(state)  # per-channel buffers resized on load
    for key, value in fq.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert all(torch.equal(a, b) for a, b in zip(fresh.calculate_qparams(), fq.calculate_qparams()))
    assert fresh._observer_on is False  # forward sees the loaded flags
    before = fresh.activation_post_process.min_val.clone()
    fresh(torch.randn(2, 5, 4, 4) * 9)
    assert torch.equal(fresh.activation_post_process.min_val, before)


def test_state_dict_round_trip_of_mismatched_observer():
    fq = make(bits=3)
    fq(torch.randn(2, 3, 4, 4))
    fq(torch.randn(2, 48))
    fresh = make(bits=3)
    fresh.load_state_dict(fq.state_dict())
    assert fresh.activation_post_process.channel_mismatch
    assert all(torch.equal(a, b) for a, b in zip(fresh.calculate_qparams(), fq.calculate_qparams()))


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(self.conv(x)))), 1))


def prepared_small(seed, placement="all", **qconfig_kwargs):
    torch.manual_seed(seed)
    mapping = granq_ao.get_granq_qat_qconfig_mapping(4, 4, act_placement=placement, fused=False,
                                                     **qconfig_kwargs)
    return granq_ao.prepare_qat_fx(SmallNet().train(), mapping, (torch.randn(2, 3, 8, 8),))


def test_state_dict_round_trip_through_prepared_fx_model():
    model = prepared_small(0)
    for x in batches([(4, 3, 8, 8)] * 3):
        model(x)
    fresh = prepared_small(1)
    fresh.load_state_dict(model.state_dict())
    model.eval()
    fresh.eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(fresh(x), model(x))
    fresh_modules = dict(fresh.named_modules())
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, GranQFakeQuantize):
            count += 1
            for a, b in zip(module.calculate_qparams(), fresh_modules[name].calculate_qparams()):
                assert torch.equal(a, b), name
    assert count >= 4


# ----------------------------------------------------------------------------- bad input
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.act_fq = make(bits=4)

    def forward(self, x):
        return self.act_fq(x)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()

    def forward(self, x):
        return self.block(x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_error_names_the_module(bad):
    model = Outer()
    x = torch.randn(2, 3, 4, 4)
    model(x)
    observer = model.block.act_fq.activation_post_process
    before = (observer.min_val.clone(), observer.max_val.clone(), observer.min_val_tensor.clone())
    x[1, 1, 2, 2] = bad
    with pytest.raises(NonFiniteInputError, match=r"'block\.act_fq'.*NaN or infinite"):
        model(x)
    # the observer was not poisoned
    assert all(torch.equal(a, b) for a, b in zip(
        before, (observer.min_val, observer.max_val, observer.min_val_tensor)))
    with pytest.raises(NonFiniteInputError, match="GranQFakeQuantize"):
        make(bits=4)(x)  # called directly: at least the class


def test_check_finite_off_lets_nan_through():
    fq = make(bits=4, check_finite=False)
    x = torch.randn(2, 3, 4, 4)
    x[1, 1, 2, 2] = float("nan")
    y = fq(x)
    assert torch.isnan(y[1, 1, 2, 2])  # no error: the NaN propagates
    assert torch.equal(y[0], make(bits=4)(x[:1])[0])  # other samples: quantized as usual
    assert "check_finite=False" in repr(fq) and "check_finite" not in repr(make(bits=4))
    qconfig = granq_ao.get_granq_qconfig(4, 4, check_finite=False)
    assert qconfig.activation().check_finite is False and qconfig.weight().check_finite is False


def test_non_finite_error_names_the_fx_fake_quant():
    model = prepared_small(0)
    x = torch.randn(2, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteInputError, match=r"'activation_post_process_\d+'"):
        model(x)


@pytest.mark.parametrize("granularity", ["granq", "channel", "tensor"])
def test_module_empty_batch(granularity):
    fq = make(bits=4, granularity=granularity)
    x = torch.empty(0, 3, 4, 4)
    assert fq(x).shape == (0, 3, 4, 4)
    assert fq.activation_post_process.min_val.numel() == 0  # nothing recorded


def test_module_constant_channel_preserved():
    x = torch.randn(2, 3, 4, 4)
    x[:, 2] = 0.7
    y = make(bits=2)(x)
    assert torch.equal(y[:, 2], x[:, 2])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_module_half_precision(dtype):
    x = torch.randn(2, 3, 4, 4).to(dtype)
    y = make(bits=3)(x)
    assert y.dtype == dtype
    assert torch.equal(y, F.fake_quantize(x.float(), 3, fused=False).to(dtype))


def test_module_channels_last_and_non_contiguous():
    x = torch.randn(2, 3, 6, 5)
    expected = make(bits=3)(x)
    y = make(bits=3)(x.to(memory_format=torch.channels_last))
    assert torch.equal(y, expected) and y.is_contiguous(memory_format=torch.channels_last)
    strided = torch.randn(2, 3, 12, 5)[:, :, ::2]
    assert torch.equal(make(bits=3)(strided), make(bits=3)(strided.contiguous()))


def test_module_bad_rank_axis_and_dtype_name_the_module():
    with pytest.raises(ValueError, match="GranQFakeQuantize.*rank >= 2"):
        make(bits=4)(torch.randn(5))
    with pytest.raises(ValueError, match="out of range"):
        make(bits=4, ch_axis=3)(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="GranQFakeQuantize.*floating-point"):
        make(bits=4)(torch.ones(2, 3, dtype=torch.int64))
    assert make(bits=4, granularity="tensor")(torch.zeros(5)).shape == (5,)  # rank 1 is fine per tensor
