"""Numerics at the edges: ranges that overflow float32 are refused, float64 stays float64, prepared
models on other dtypes and the meta device, a sample's output independent of the other samples,
meta tensors on the auto path. docs/RELIABILITY.md."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import granq_ao
from conftest import prepare


def reference_fake_quantize(x, bits: int, dims) -> np.ndarray:
    """The asymmetric formula in numpy float64 (an independent implementation), reduced over dims."""
    a = x.numpy().astype(np.float64)
    lo, hi = a.min(axis=dims, keepdims=True), a.max(axis=dims, keepdims=True)
    scale = (hi - lo) / (2**bits - 1)
    safe = np.where(scale > 0, scale, 1.0)
    zero_point = np.where(scale > 0, np.round(-lo / safe), 0.0)
    codes = np.clip(np.round(a / safe + zero_point), 0, 2**bits - 1)
    return np.where(scale > 0, (codes - zero_point) * safe, a)


@pytest.mark.parametrize("fused", ["eager", "compiled"])
@pytest.mark.parametrize("granularity", ["granq", "tensor"])
def test_float32_range_that_overflows_is_refused(fused, granularity):
    """Finite values near +-3e38 give max - min = inf: the output was all NaN, with no error even
    with check_finite. It is refused now, with the range and the ways out."""
    from granq_ao.functional import NonFiniteInputError

    x = torch.tensor([3e38, -3e38, 1.0, 2.0]).reshape(1, 1, 4)
    with pytest.raises(NonFiniteInputError, match=r"too wide.*overflows torch.float32.*Scale the input down"):
        granq_ao.fake_quantize(x, 4, granularity, fused=fused)
    with pytest.raises(NonFiniteInputError, match="overflows"):
        torch.ops.granq_ao.choose_qparams_dynamic(x, 4, granularity, 1, False, True)
    with pytest.raises(NonFiniteInputError, match=r"GranQFakeQuantize.*overflows"):
        granq_ao.GranQFakeQuantize(bits=4, granularity=granularity, fused=fused)(x)
    # the symmetric scale (max |x| / 7.5) does not overflow: quantized exactly as the formula says
    out = granq_ao.fake_quantize(x, 4, granularity, symmetric=True, fused=fused)
    scale = 3e38 / 7.5
    expected = torch.clamp(torch.round(x.double() / scale), -8, 7) * scale
    assert torch.isfinite(out).all() and torch.allclose(out.double(), expected, rtol=1e-6)
    # NaN input keeps its own message
    with pytest.raises(NonFiniteInputError, match="NaN or infinite"):
        granq_ao.fake_quantize(torch.tensor([[[float("nan"), 1.0]]]), 4, granularity, fused=fused)


@pytest.mark.numerics
@pytest.mark.parametrize("fused", ["eager", "compiled"])
def test_float64_input_is_computed_in_float64(fused):
    """float64 was computed in float32: 1e300 was reported as "NaN or infinite", 1e-50 became 0 and a
    constant slice 0.1 came back as 0.10000000149. Now the ranges, qparams and output are float64
    and equal the formula computed in float64."""
    x = torch.tensor([[[1e300, -2e300, 5e299, 0.0], [1e-50, 3e-50, -2e-50, 7e-51],
                       [0.1, 0.1, 0.1, 0.1]]], dtype=torch.float64)
    out, x_min, x_max = granq_ao.functional.fake_quantize_dynamic(x, 4, fused=fused)
    assert out.dtype == x_min.dtype == torch.float64
    assert np.array_equal(out.numpy(), reference_fake_quantize(x, 4, (2,)))
    assert out[0, 2].tolist() == [0.1] * 4  # constant slice: passes through exactly
    assert (out[0, 1] != 0).all()
    # the dynamic reference ops agree
    scale, zero_point = torch.ops.granq_ao.choose_qparams_dynamic(x, 4, "granq", 1, False, True)
    codes = torch.ops.granq_ao.quantize(x, scale, zero_point, 4, False)
    assert torch.equal(torch.ops.granq_ao.dequantize(codes, scale, zero_point, x), out)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_prepared_model_moved_to_another_dtype_trains_and_converts(dtype):
    """model.double() made the observers' buffers float64 and the next batch failed ("expected dtype
    double for `end`"). Every float dtype now trains and converts (dynamic) to the same numbers;
    the static export, whose torch ops take float32 only, says so."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 2))
    qat = prepare(model, torch.randn(1, 3, 5, 5)).to(dtype)
    x = torch.randn(2, 3, 5, 5, dtype=dtype)
    qat(x).float().sum().backward()
    qat(x)
    qat.eval()
    assert torch.equal(granq_ao.convert_to_reference_fx(qat)(x), qat(x))
    with pytest.raises(ValueError, match=r"float32 only.*model.float\(\).*mode='dynamic'"):
        granq_ao.convert_to_reference_fx(qat, mode="static")


def test_prepared_model_runs_on_the_meta_device():
    """The finiteness check read a flag from the device: on meta tensors "Tensor.item() cannot be
    called on meta tensors". Meta tensors hold no values; shapes propagate."""
    qat = prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), torch.randn(1, 3, 5, 5)).to("meta")
    out = qat(torch.empty(2, 3, 5, 5, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 4, 3, 3)
    assert granq_ao.fake_quantize(torch.empty(2, 3, 4, device="meta"), 4).shape == (2, 3, 4)


@pytest.mark.numerics
def test_sample_output_does_not_depend_on_other_samples_at_a_fixed_batch_size():
    """What README promises: at a given batch size, replacing the other samples of the batch leaves a
    sample's output bit for bit unchanged (GranQ ranges are per sample). Across batch sizes it is not
    promised: PyTorch may sum in another order at another batch size, and a low-bit step amplifies a
    one-ulp difference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    qat = prepare(model, torch.randn(2, 3, 12, 12), act_placement="paper")
    qat(torch.randn(8, 3, 12, 12))
    qat.eval()
    sample = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        first = qat(torch.cat([sample, torch.randn(3, 3, 12, 12)]))[0]
        second = qat(torch.cat([sample, torch.randn(3, 3, 12, 12) * 10]))[0]
    assert torch.equal(first, second)


def test_meta_tensors_do_not_switch_the_auto_path_to_eager(monkeypatch):
    """torch.compile cannot compile for meta tensors; the auto path used to take that failure as
    "compiling is not usable here" and fell back to eager for the whole process, with a warning."""
    from granq_ao import functional

    monkeypatch.setattr(functional, "_auto_backend", None)
    monkeypatch.delenv("GRANQ_FUSED", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        granq_ao.fake_quantize(torch.empty(2, 3, 4, device="meta"), 4, fused="auto")
    assert functional.fused_backend("auto") != "eager"
