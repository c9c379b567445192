"""Hardening (issue 11): saved models that load, conversions that match QAT, bad input that fails
early with a message naming the problem and the fix. docs/RELIABILITY.md lists what each test
guarantees."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import granq_ao

ROOT = Path(__file__).resolve().parents[1]


def run_fresh(code: str) -> str:
    """Run ``code`` in a new interpreter that imports this checkout's granq_ao; its stdout."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               GRANQ_FUSED="eager")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def prepare(model: nn.Module, example: torch.Tensor, **kwargs) -> torch.fx.GraphModule:
    kwargs.setdefault("fused", "eager")
    return granq_ao.prepare_qat_fx(model.train(), granq_ao.get_granq_qat_qconfig_mapping(**kwargs), (example,))


class Mixed(nn.Module):
    """Conv-BN-ReLU (fused QAT module), sigmoid (torch.ao's fixed-qparams fake-quant), reshape
    (torch.ao's reuse-input observer), LayerNorm (torch.ao's weight qconfig), Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        y = torch.sigmoid(y).reshape(y.shape[0], 4, 36)[..., :6]
        return self.fc(self.norm(y))


# ----------------------------------------------------------------------------- 1. whole-model pickling
def test_prepared_qat_model_pickles_and_loads_in_a_fresh_process(tmp_path):
    """torch.save of a prepared model failed on torch.ao's local factory_kwargs function stored in
    every module's qconfig. Loaded in a new interpreter, the model computes the same numbers,
    trains on, and converts to the same reference model."""
    torch.manual_seed(0)
    qat = prepare(Mixed(), torch.randn(2, 3, 8, 8))
    qat(torch.randn(4, 3, 8, 8))  # observers and BN statistics hold data
    x = torch.randn(3, 3, 8, 8)
    qat.eval()
    expected = qat(x)
    expected_ref = granq_ao.convert_to_reference_fx(qat)(x)
    path = tmp_path / "qat.pt"
    torch.save({"model": qat, "x": x, "expected": expected, "ref": expected_ref}, path)
    out = run_fresh(
        "import torch, granq_ao\n"
        f"d = torch.load({str(path)!r}, weights_only=False)\n"
        "m = d['model']\n"
        "assert torch.equal(m(d['x']), d['expected'])\n"
        "assert torch.equal(granq_ao.convert_to_reference_fx(m)(d['x']), d['ref'])\n"
        "m.train(); m(d['x']).sum().backward()\n"
        "assert m.conv.weight.grad is not None and m.conv.weight.grad.abs().sum() > 0\n"
        "print('ok')\n")
    assert out.strip() == "ok"


def test_torch_prepare_with_granq_mapping_pickles_too():
    """The mapping's constructors (GranQ's and the torch.ao ones it keeps) pickle, so torch's own
    prepare_qat_fx with a GranQ mapping gives a picklable model as well."""
    from torch.ao.quantization.quantize_fx import prepare_qat_fx as torch_prepare_qat_fx
    import io
    import pickle

    mapping = granq_ao.get_granq_qat_qconfig_mapping(4, 4, fused="eager")
    qat = torch_prepare_qat_fx(Mixed().train(), mapping, (torch.randn(2, 3, 8, 8),))
    for name, module in qat.named_modules():
        if getattr(module, "qconfig", None) is not None:
            pickle.dumps(module.qconfig)  # raised on the local factory_kwargs function
    buffer = io.BytesIO()
    torch.save(qat, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded.eval()(x), qat.eval()(x))


def test_prepared_model_pickles_with_torch_default_mapping_and_a_granq_global_qconfig():
    """granq_ao.prepare_qat_fx makes every stored qconfig picklable, whatever mapping it came from:
    torch's default mapping keeps torch.ao's own fixed-qparams constructors (sigmoid), which carry
    the same local function."""
    import io

    from torch.ao.quantization import get_default_qat_qconfig_mapping

    mapping = get_default_qat_qconfig_mapping("x86").set_global(granq_ao.get_granq_qconfig(4, 4, fused="eager"))
    qat = granq_ao.prepare_qat_fx(Mixed().train(), mapping, (torch.randn(2, 3, 8, 8),))
    buffer = io.BytesIO()
    torch.save(qat, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded.eval()(x), qat.eval()(x))
    assert torch.equal(granq_ao.convert_to_reference_fx(loaded)(x), granq_ao.convert_to_reference_fx(qat)(x))


def test_loaded_observer_records_its_first_batch():
    """A GranQObserver saved before any batch (empty per-channel buffers) and loaded by torch.load
    got buffers whose storage cannot be resized: its first batch raised "Trying to resize storage
    that is not resizable"; so did load_state_dict of another channel count into a loaded one."""
    import io

    buffer = io.BytesIO()
    torch.save(granq_ao.GranQObserver(bits=4), buffer)
    buffer.seek(0)
    observer = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 3, 4, 4)
    observer(x)
    assert torch.equal(observer.min_val, x.amin(dim=(0, 2, 3)))
    other = granq_ao.GranQObserver(bits=4)
    other(torch.randn(2, 5, 4, 4))
    observer.load_state_dict(other.state_dict())
    assert torch.equal(observer.max_val, other.max_val)


def test_eager_prepared_model_pickles():
    """Eager-mode prepare_qat stores the (now picklable) qconfig on every module as well."""
    import io

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    model.qconfig = granq_ao.get_granq_qconfig(4, 4, fused="eager")
    qat = torch.ao.quantization.prepare_qat(model.train())
    buffer = io.BytesIO()
    torch.save(qat, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(loaded(x), qat(x))


def test_converting_a_loaded_torch_prepared_model_says_what_to_do():
    """torch.ao keeps its prepare metadata in GraphModule.meta, which pickling drops: a model
    prepared by torch's prepare_qat_fx and loaded again cannot be converted; say so."""
    import io

    from torch.ao.quantization.quantize_fx import prepare_qat_fx as torch_prepare_qat_fx

    mapping = granq_ao.get_granq_qat_qconfig_mapping(4, 4, fused="eager")
    qat = torch_prepare_qat_fx(nn.Sequential(nn.Conv2d(3, 4, 3)).train(), mapping, (torch.randn(1, 3, 6, 6),))
    buffer = io.BytesIO()
    torch.save(qat, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with pytest.raises(ValueError, match="holds no prepare metadata.*granq_ao.prepare_qat_fx.*load_state_dict"):
        granq_ao.convert_to_reference_fx(loaded.eval())


def test_preparing_a_prepared_model_is_refused():
    """torch.ao's prepare_qat_fx on a prepared model failed with a Proxy TypeError."""
    example = (torch.randn(1, 3, 6, 6),)
    qat = prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), example[0])
    mapping = granq_ao.get_granq_qat_qconfig_mapping(4, 4)
    with pytest.raises(ValueError, match="already prepared.*Pass the float model.*load_state_dict"):
        granq_ao.prepare_qat_fx(qat, mapping, example)
    eager = nn.Sequential(nn.Conv2d(3, 4, 3))
    eager.qconfig = granq_ao.get_granq_qconfig(4, 4)
    eager = torch.ao.quantization.prepare_qat(eager.train())
    with pytest.raises(ValueError, match="already prepared"):
        granq_ao.prepare_qat_fx(eager, mapping, example)


# ----------------------------------------------------------------------------- 2. QAT == convert, every module kind
class Embed(nn.Module):
    def __init__(self, bag: bool) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(10, 6) if bag else nn.Embedding(10, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, index):
        return self.fc(self.embed(index))


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4, 2, 2))
        self.v = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        y = nn.functional.conv_transpose2d(x, self.w)
        return nn.functional.linear(y.mean((2, 3))[:, :4], self.v)


MODULE_KINDS = {  # name: (model, input shape or integer input)
    "conv_transpose1d": (lambda: nn.Sequential(nn.Conv1d(3, 6, 3, padding=1), nn.ReLU(),
                                               nn.ConvTranspose1d(6, 4, 2, stride=2)), (2, 3, 8)),
    "conv_transpose2d": (lambda: nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                                               nn.ConvTranspose2d(6, 4, 2, stride=2)), (2, 3, 8, 8)),
    "conv_transpose3d": (lambda: nn.Sequential(nn.ConvTranspose3d(3, 4, 2, stride=2)), (2, 3, 3, 3, 3)),
    "conv_transpose_bn_relu": (lambda: nn.Sequential(nn.ConvTranspose2d(3, 6, 2, stride=2), nn.BatchNorm2d(6),
                                                     nn.ReLU()), (2, 3, 4, 4)),
    "conv1d_bn_relu": (lambda: nn.Sequential(nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6), nn.ReLU()), (2, 3, 8)),
    "conv2d_bn": (lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)), (2, 3, 8, 8)),
    "conv3d_bn_relu": (lambda: nn.Sequential(nn.Conv3d(3, 6, 3), nn.BatchNorm3d(6), nn.ReLU()), (2, 3, 5, 5, 5)),
    "bn_relu": (lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.BatchNorm2d(6), nn.ReLU()), (2, 3, 8, 8)),
    "linear_bn": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(48, 5), nn.BatchNorm1d(5)), (2, 3, 4, 4)),
    "layer_norm_group_norm": (lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.LayerNorm(6), nn.GroupNorm(2, 6),
                                                    nn.InstanceNorm2d(6)), (2, 3, 8, 8)),
    "prelu_hardswish": (lambda: nn.Sequential(nn.Conv2d(3, 6, 1), nn.PReLU(), nn.Hardswish()), (2, 3, 5, 5)),
    "embedding": (lambda: Embed(bag=False), "index"),
    "embedding_bag": (lambda: Embed(bag=True), "index"),
    "functional_weights": (Functional, (2, 6, 4, 4)),
}


@pytest.mark.parametrize("kind", sorted(MODULE_KINDS))
def test_every_module_kind_is_quantized_the_same_in_qat_and_convert(kind):
    """A ConvTranspose2d was float in QAT (torch.ao has no QAT module for it) but its weight was
    quantized by the converter (max difference 0.109). Each module kind is now quantized the same
    way in both, or left float in both: the reference model equals the QAT model in eval, and
    weights without a weight fake-quant in QAT are float (unchanged) in the reference model."""
    torch.manual_seed(0)
    build, shape = MODULE_KINDS[kind]
    x = torch.randint(0, 10, (2, 5)) if shape == "index" else torch.randn(*shape)
    float_model = build()
    float_weights = {name: p.detach().clone() for name, p in float_model.named_parameters()}
    qat = prepare(float_model, x)
    qat(x)
    qat.eval()
    ref = granq_ao.convert_to_reference_fx(qat)
    assert torch.equal(ref(x), qat(x))
    quantized = {name for name, module in qat.named_modules() if hasattr(module, "weight_fake_quant")}
    for name, module in ref.named_modules():
        weight = getattr(module, "weight", None)
        key = f"{name}.weight"
        if isinstance(weight, torch.Tensor) and key in float_weights and name not in quantized:
            assert torch.equal(weight, float_weights[key]), f"{kind}: {name} quantized only in convert"


# ----------------------------------------------------------------------------- 3. static convert needs observed ranges
@pytest.mark.parametrize("act", ["granq", "tensor"])
def test_static_convert_before_any_data_is_refused(act):
    """Converting statically before the observers saw a batch succeeded, then failed at inference
    ("length of scales must equal to channel") or, per tensor, returned wrong outputs."""
    example = torch.randn(2, 3, 8, 8)
    qat = prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), example, act_granularity=act).eval()
    with pytest.raises(ValueError, match="has seen no data.*representative batches.*mode='dynamic'"):
        granq_ao.convert_to_reference_fx(qat, mode="static")
    granq_ao.convert_to_reference_fx(qat)  # dynamic mode needs no observed ranges
    qat.train()(example)
    ref = granq_ao.convert_to_reference_fx(qat.eval(), mode="static")
    assert ref(example).shape == (2, 4, 6, 6)


# ----------------------------------------------------------------------------- 4. ranges that overflow, float64
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


# ----------------------------------------------------------------------------- 5. also seen
@pytest.mark.parametrize("other", [dict(weight_bits=8, act_bits=8), dict(symmetric_acts=True),
                                   dict(act_granularity="tensor"), dict(weight_granularity="kernel")])
def test_state_dict_from_other_quantization_settings_is_refused(other):
    """A 4-bit state_dict loaded silently into a model prepared with 8 bits (or symmetric): the
    settings that shape the numbers travel with the state_dict and are compared on load."""
    def build(**kwargs):
        torch.manual_seed(0)
        return prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), torch.randn(1, 3, 5, 5), **kwargs)

    trained = build(weight_bits=4, act_bits=4)
    trained(torch.randn(2, 3, 5, 5))
    state = trained.state_dict()
    same = build(weight_bits=4, act_bits=4)
    same.load_state_dict(state)
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(same.eval()(x), trained.eval()(x))
    with pytest.raises(RuntimeError, match=r"saved from a 4-bit asymmetric .* this one is .*Prepare the model "
                                           r"with the settings it was trained with"):
        build(**{"weight_bits": 4, "act_bits": 4, **other}).load_state_dict(state)
    # a state_dict saved before the settings were saved still loads
    build(weight_bits=4, act_bits=4).load_state_dict({k: v for k, v in state.items() if "_extra_state" not in k})


def test_paper_placement_on_a_model_without_relu_warns():
    """act_placement="paper" on a model with no ReLU left zero activation quantizers silently."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid(), nn.Conv2d(4, 4, 1))
    with pytest.warns(granq_ao.PlacementWarning, match="left 0 activation fake-quants.*ReLU.*has none.*"
                                                       r"act_placement='inputs' would quantize the 2 conv/linear"):
        qat = prepare(model, torch.randn(1, 3, 6, 6), act_placement="paper")
    assert granq_ao.count_activation_fake_quant_calls(qat) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", granq_ao.PlacementWarning)
        qat = prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), torch.randn(1, 3, 6, 6), act_placement="paper")
    assert granq_ao.count_activation_fake_quant_calls(qat) == 1


# ----------------------------------------------------------------------------- NVIDIA pytorch-quantization adapter
def test_nvidia_after_relu_placement_without_relu_warns():
    gq = pytest.importorskip("granq_ao.integrations.pytorch_quantization")
    from pytorch_quantization import nn as quant_nn

    model = nn.Sequential(quant_nn.QuantConv2d(3, 4, 3), nn.Sigmoid(), quant_nn.QuantConv2d(4, 4, 1))
    with pytest.warns(UserWarning, match="no quant module fed by a ReLU.*only_after_relu=False"):
        replaced = gq.replace_input_quantizers(model, gq.GranQDescriptor(num_bits=4), only_after_relu=True,
                                               example_inputs=torch.randn(1, 3, 6, 6))
    assert replaced == []


def nvidia_calibrate(model, batches):
    """pytorch-quantization's documented calibration: collect_stats then compute_amax."""
    from pytorch_quantization import calib
    from pytorch_quantization import nn as quant_nn

    quantizers = [m for m in model.modules() if isinstance(m, quant_nn.TensorQuantizer)]
    for module in quantizers:
        if module._calibrator is not None:
            module.disable_quant()
            module.enable_calib()
        else:
            module.disable()
    with torch.no_grad():
        for x in batches:
            model(x)
    for module in quantizers:
        if module._calibrator is not None:
            module.enable_quant()
            module.disable_calib()
        else:
            module.enable()
    for module in quantizers:
        if module._calibrator is not None:
            if isinstance(module._calibrator, calib.MaxCalibrator):
                module.load_calib_amax()
            else:
                module.load_calib_amax("percentile", percentile=99.99)


def test_nvidia_compute_amax_after_disable_others():
    """After quant_modules.initialize() and replace_input_quantizers(..., disable_others=True) the
    usual compute_amax step died with "Calibrator returned None" on the disabled quantizers."""
    gq = pytest.importorskip("granq_ao.integrations.pytorch_quantization")
    from pytorch_quantization import quant_modules

    torch.manual_seed(0)
    quant_modules.initialize()
    try:
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(16, 2))
    finally:
        quant_modules.deactivate()
    replaced = gq.replace_input_quantizers(model, gq.GranQDescriptor(num_bits=4, fused=False), only_after_relu=True,
                                           example_inputs=torch.randn(1, 3, 6, 6), disable_others=True)
    assert replaced == ["2"]
    nvidia_calibrate(model, [torch.randn(4, 3, 6, 6)])
    for name in ("0", "4"):  # disabled: float, no amax, still disabled
        quantizer = getattr(model, name)._input_quantizer
        assert isinstance(quantizer, gq.DisabledTensorQuantizer) and quantizer._disabled
        assert "_amax" not in quantizer._buffers
        assert getattr(model, name)._weight_quantizer.amax is not None  # weights calibrated as usual
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(model[0]._input_quantizer(x), x)


def test_nvidia_set_default_quant_desc_with_granq_descriptor_names_the_fix():
    """QuantConv2d.set_default_quant_desc_input(GranQDescriptor(...)) failed with pytorch-quantization's
    "{} is not an instance of QuantDescriptor!"; NVIDIA's quant modules cannot hold GranQ
    quantizers, so the error now names the GranQ module and helpers to use."""
    gq = pytest.importorskip("granq_ao.integrations.pytorch_quantization")
    from pytorch_quantization import nn as quant_nn
    from pytorch_quantization.tensor_quant import QuantDescriptor

    with pytest.raises(TypeError, match=r"QuantConv2d.*GranQConv2d.set_default_quant_desc_input.*replace_input"):
        quant_nn.QuantConv2d.set_default_quant_desc_input(gq.GranQDescriptor(num_bits=4))
    with pytest.raises(TypeError, match=r"GranQMaxPool2d.set_default_quant_desc_input"):
        quant_nn.QuantMaxPool2d.set_default_quant_desc_input(gq.GranQDescriptor(num_bits=4))
    with pytest.raises(TypeError, match=r"GranQLinear.set_default_quant_desc_weight"):
        quant_nn.QuantLinear.set_default_quant_desc_weight(gq.GranQDescriptor(num_bits=4))
    before = quant_nn.QuantConv2d.default_quant_desc_input
    try:  # NVIDIA's own descriptors work as before, and the GranQ modules take GranQ's
        quant_nn.QuantConv2d.set_default_quant_desc_input(QuantDescriptor(num_bits=6))
        assert quant_nn.QuantConv2d(3, 4, 3)._input_quantizer.num_bits == 6
        with pytest.raises(ValueError, match="not an instance of QuantDescriptor"):
            quant_nn.QuantConv2d.set_default_quant_desc_input("8 bits")
    finally:
        quant_nn.QuantConv2d.default_quant_desc_input = before
    saved = gq.GranQConv2d.__dict__.get("default_quant_desc_input")
    try:
        gq.GranQConv2d.set_default_quant_desc_input(gq.GranQDescriptor(num_bits=3, fused=False))
        assert gq.GranQConv2d(3, 4, 3)._input_quantizer.num_bits == 3
    finally:
        if saved is None:
            del gq.GranQConv2d.default_quant_desc_input
        else:
            gq.GranQConv2d.default_quant_desc_input = saved


class ExportsDifferently(nn.Module):
    """Adds 0.01 only in the exported graph: a stand-in for a backend that rounds differently."""

    def forward(self, x):
        return x + 0.01 if torch.onnx.is_in_onnx_export() else x


def test_nvidia_onnx_export_warns_when_onnxruntime_differs_from_pytorch():
    """An export mixing NVIDIA's 8-bit quantizers with GranQ differed from PyTorch by 0.157 with no
    warning. export_onnx now runs the graph in onnxruntime on the example inputs and warns with the
    difference and its cause; a faithful export stays silent."""
    gq = pytest.importorskip("granq_ao.integrations.pytorch_quantization")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    with gq.granq_quant_modules(gq.GranQDescriptor(num_bits=4, fused=False)):
        conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gq.OnnxMismatchWarning)
        gq.export_onnx(conv, x)
    with pytest.warns(gq.OnnxMismatchWarning, match=r"differs from PyTorch's by up to 0.01.*not bit-exact"):
        gq.export_onnx(nn.Sequential(conv, ExportsDifferently()), x)


# ----------------------------------------------------------------------------- documented guarantees
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
