"""granq_ao.integrations.pytorch_quantization against the real NVIDIA pytorch-quantization 2.1.3."""
import copy
import dataclasses
import importlib
import io
import subprocess
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

# Imported first: it hides pytorch-quantization's import-time torch.jit.script FutureWarning.
gq = pytest.importorskip("granq_ao.integrations.pytorch_quantization")

from pytorch_quantization import calib, quant_modules  # noqa: E402
from pytorch_quantization import nn as quant_nn  # noqa: E402
from pytorch_quantization.nn.modules import _utils as quant_nn_utils  # noqa: E402
from pytorch_quantization.tensor_quant import QuantDescriptor  # noqa: E402

import granq_ao  # noqa: E402
from granq_ao.integrations.torch_ao.fake_quantize import GranQFakeQuantize  # noqa: E402
from granq_ao.functional import NonFiniteInputError  # noqa: E402
from granq_ao.integrations.pytorch_quantization import (  # noqa: E402
    GranQCalibrationWarning,
    GranQDescriptor,
    GranQTensorQuantizer,
)

EAGER = dict(fused=False)


@pytest.fixture(autouse=True)
def _eager_math(monkeypatch):
    monkeypatch.setenv("GRANQ_FUSED", "0")


# ----------------------------------------------------------------------------- reference formula
def reference_granq(x, bits):
    """Independent GranQ formula: per (n, c) over space; rank 2: per row.
    s = (max - min) / (2^b - 1), z = round(-min / s), xq = clamp(round(x / s + z), 0, 2^b - 1),
    x_hat = s * (xq - z); a constant slice (s = 0, e.g. a dead ReLU channel) passes unchanged."""
    dims = tuple(range(2, x.dim())) if x.dim() > 2 else (1,)
    x_min = x.amin(dim=dims, keepdim=True)
    x_max = x.amax(dim=dims, keepdim=True)
    s = (x_max - x_min) / (2**bits - 1)
    z = torch.round(-x_min / s)
    xq = torch.clamp(torch.round(x / s + z), 0, 2**bits - 1)
    return torch.where(s > 0, s * (xq - z), x)


def nvidia_weight_fake_quant(w, bits):
    """pytorch-quantization's per-output-channel symmetric weight fake-quant, written out:
    amax per out channel, scale = (2^(b-1) - 1) / amax, w_hat = clamp(round(w * scale), -q, q) / scale."""
    amax = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True)
    bound = 2.0 ** (bits - 1) - 1
    scale = bound / amax
    return torch.clamp(torch.round(w * scale), -bound, bound) / scale


# ----------------------------------------------------------------------------- import hygiene
def test_import_granq_ao_does_not_need_pytorch_quantization():
    code = ("import sys, granq_ao, granq_ao.integrations; "
            "assert 'pytorch_quantization' not in sys.modules, 'granq_ao imported pytorch_quantization'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_missing_pytorch_quantization_gives_install_hint(monkeypatch):
    saved = {name: module for name, module in sys.modules.items()
             if name == "pytorch_quantization" or name.startswith("pytorch_quantization.")
             or name.startswith("granq_ao.integrations.pytorch_quantization")}
    try:
        for name in saved:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, "pytorch_quantization", None)  # import -> ImportError
        with pytest.raises(ImportError, match=r'pip install -e "\.\[nvidia\]"'):
            importlib.import_module("granq_ao.integrations.pytorch_quantization")
    finally:
        monkeypatch.undo()
        sys.modules.update(saved)
    assert importlib.import_module("granq_ao.integrations.pytorch_quantization") is gq


# ----------------------------------------------------------------------------- the quantizer
def test_is_a_tensor_quantizer_and_repr():
    quantizer = GranQTensorQuantizer(GranQDescriptor(num_bits=3, **EAGER))
    assert isinstance(quantizer, quant_nn.TensorQuantizer)
    assert quantizer.num_bits == 3 and quantizer.axis == 1 and quantizer.amax is None
    assert quantizer._calibrator is None
    assert "3bit granq asymmetric axis=1 dynamic" in repr(quantizer)


@pytest.mark.numerics
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(4, 6), (3, 5, 7), (2, 4, 6, 5), (2, 3, 4, 3, 5)])
def test_forward_matches_independent_formula(bits, shape):
    torch.manual_seed(bits * 100 + len(shape))
    x = torch.randn(*shape) * 3 + 0.5
    out = GranQTensorQuantizer(GranQDescriptor(num_bits=bits, **EAGER))(x)
    expected = reference_granq(x, bits)
    assert torch.equal(out, expected)
    # Each (n, c) slice lands on at most 2^b levels, and the error is at most half a step.
    step = reference_granq(x, bits) - x
    dims = tuple(range(2, x.dim())) if x.dim() > 2 else (1,)
    s = (x.amax(dim=dims, keepdim=True) - x.amin(dim=dims, keepdim=True)) / (2**bits - 1)
    assert bool((step.abs() <= s / 2 * (1 + 1e-5) + 1e-7).all())
    assert out[0, 0].unique().numel() <= 2**bits


@pytest.mark.numerics
@pytest.mark.parametrize("granularity", ["granq", "channel", "tensor", "granq_iterative"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_bit_equal_to_torch_ao_fake_quantize(granularity, symmetric):
    torch.manual_seed(1)
    x = torch.randn(3, 4, 5, 6) * 2 + 0.3
    ours = GranQTensorQuantizer(GranQDescriptor(num_bits=3, granularity=granularity, symmetric=symmetric, **EAGER))
    theirs = GranQFakeQuantize(bits=3, granularity=granularity, ch_axis=1, symmetric=symmetric, fused=False)
    assert torch.equal(ours(x), theirs(x))


@pytest.mark.numerics
def test_weight_granularity_bit_equal_to_torch_ao():
    w = torch.randn(8, 4, 3, 3)
    ours = GranQTensorQuantizer(GranQDescriptor(num_bits=4, granularity="channel", axis=0, **EAGER))
    theirs = GranQFakeQuantize(bits=4, granularity="channel", ch_axis=0, fused=False, dtype=torch.qint8)
    assert torch.equal(ours(w), theirs(w))


def test_quant_descriptor_is_accepted():
    quantizer = GranQTensorQuantizer(QuantDescriptor(num_bits=3))
    assert quantizer.quant_desc == GranQDescriptor(num_bits=3, granularity="granq", axis=1)
    assert GranQTensorQuantizer(QuantDescriptor(num_bits=5, axis=(2,))).quant_desc.axis == 2
    assert GranQTensorQuantizer(QuantDescriptor(num_bits=5), granularity="channel").granularity.name == "channel"
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(quantizer(x), reference_granq(x, 3))
    with pytest.raises(ValueError, match="static range"):
        GranQTensorQuantizer(QuantDescriptor(num_bits=4, amax=2.0))
    with pytest.raises(ValueError, match="static range"):
        GranQTensorQuantizer(QuantDescriptor(num_bits=4, learn_amax=True))
    with pytest.raises(ValueError, match="one channel axis"):
        GranQTensorQuantizer(QuantDescriptor(num_bits=4, axis=(0, 1)))
    with pytest.raises(ValueError, match="bits"):
        GranQTensorQuantizer(QuantDescriptor(num_bits=9))
    with pytest.raises(ValueError, match="if_clip"):
        GranQTensorQuantizer(if_clip=True)


def test_descriptor_is_immutable_data():
    desc = GranQDescriptor(num_bits=4, granularity="channel", axis=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        desc.num_bits = 8
    assert desc.replace(num_bits=8).num_bits == 8 and desc.num_bits == 4
    assert GranQDescriptor(**desc.dict()) == desc
    assert hash(desc) == hash(GranQDescriptor(num_bits=4, granularity="channel", axis=0))
    assert (desc.quant_min, desc.quant_max) == (0, 15)
    assert (desc.replace(symmetric=True).quant_min, desc.replace(symmetric=True).quant_max) == (-8, 7)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, True, 4.0])
def test_bits_outside_2_to_8_are_refused(bits):
    with pytest.raises(ValueError, match=r"bits must be an integer in \[2, 8\]"):
        GranQDescriptor(num_bits=bits)


def test_num_bits_setter_validates():
    quantizer = GranQTensorQuantizer(GranQDescriptor(num_bits=4, **EAGER))
    quantizer.num_bits = 2
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(quantizer(x), reference_granq(x, 2))
    with pytest.raises(ValueError):
        quantizer.num_bits = 1
    assert quantizer.num_bits == 2


def test_bad_inputs_give_clear_errors():
    quantizer = GranQTensorQuantizer(GranQDescriptor(num_bits=4, **EAGER))
    x = torch.randn(2, 3, 4, 4)
    x[1, 2, 0, 0] = float("nan")
    with pytest.raises(NonFiniteInputError, match="NaN"):
        quantizer(x)
    with pytest.raises(NonFiniteInputError, match="inf"):
        quantizer(torch.full((2, 3, 4, 4), float("inf")))
    with pytest.raises(TypeError, match="floating-point"):
        quantizer(torch.randint(0, 5, (2, 3, 4, 4)))
    with pytest.raises(ValueError, match="rank >= 2"):
        quantizer(torch.randn(7))
    with pytest.raises(ValueError, match="out of range"):
        GranQTensorQuantizer(GranQDescriptor(axis=5, **EAGER))(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="granularity must be one of granq, channel, tensor, granq_iterative"):
        GranQDescriptor(granularity="per_pixel")


def test_errors_name_the_module():
    model = torch.nn.Sequential(quant_nn.QuantConv2d(3, 4, 3))
    gq.replace_input_quantizers(model, GranQDescriptor(**EAGER))
    with pytest.raises(NonFiniteInputError, match=r"'0\._input_quantizer'"):
        model(torch.full((1, 3, 5, 5), float("nan")))
    with gq.granq_quant_modules(GranQDescriptor(**EAGER)):
        built = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with torch.no_grad():
        built[0].bias[1] = float("inf")  # finite input, infinite activation inside
    with pytest.raises(NonFiniteInputError, match=r"'1\.0\._input_quantizer'"):
        built(torch.randn(2, 3))
    with pytest.raises(TypeError, match=r"'0\._input_quantizer'.*floating-point"):
        built(torch.ones(2, 3, dtype=torch.int64))


def test_enable_disable_and_quant_switches():
    quantizer = GranQTensorQuantizer(GranQDescriptor(num_bits=2, **EAGER))
    x = torch.randn(2, 3, 4, 4)
    quantizer.disable()
    assert quantizer(x) is x
    quantizer.enable()
    assert torch.equal(quantizer(x), reference_granq(x, 2))
    quantizer.disable_quant()
    assert quantizer(x) is x
    quantizer.enable_quant()
    assert torch.equal(quantizer(x), reference_granq(x, 2))
    assert "disabled" in repr(GranQTensorQuantizer(disabled=True))
    assert GranQTensorQuantizer(disabled=True)(x) is x
    assert GranQTensorQuantizer(if_quant=False)(x) is x


def test_calibration_is_a_noop_that_says_so():
    quantizer = GranQTensorQuantizer(GranQDescriptor(num_bits=3, **EAGER))
    with pytest.warns(GranQCalibrationWarning, match="enable_calib"):
        quantizer.enable_calib()
    small = torch.randn(2, 3, 4, 4)
    quantizer(small)
    with pytest.warns(GranQCalibrationWarning, match="load_calib_amax"):
        quantizer.load_calib_amax()
    with pytest.warns(GranQCalibrationWarning, match="amax"):
        quantizer.amax = 1.0
    quantizer.disable_calib()
    assert "_amax" not in quantizer._buffers and quantizer.amax is None
    # Still dynamic: an input 100x larger is quantized with its own ranges, not clipped.
    big = torch.randn(2, 3, 4, 4) * 100
    assert torch.equal(quantizer(big), reference_granq(big, 3))
    with pytest.warns(GranQCalibrationWarning):
        GranQTensorQuantizer(if_calib=True)


def test_nvidia_calibration_loop_leaves_granq_dynamic():
    """The calibration loop of pytorch-quantization's docs, on a model mixing both quantizers."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        quant_nn.QuantConv2d(3, 4, 3, quant_desc_input=QuantDescriptor(num_bits=8, calib_method="max")),
        torch.nn.ReLU(), quant_nn.QuantConv2d(4, 4, 3))
    model[2]._input_quantizer = GranQTensorQuantizer(GranQDescriptor(num_bits=4, **EAGER))
    quantizers = [m for m in model.modules() if isinstance(m, quant_nn.TensorQuantizer)]
    for module in quantizers:
        if module._calibrator is not None:
            module.disable_quant()
            module.enable_calib()
        else:
            module.disable()
    with torch.no_grad():
        model(torch.randn(4, 3, 8, 8))
    for module in quantizers:
        if module._calibrator is not None:
            if isinstance(module._calibrator, calib.MaxCalibrator):
                module.load_calib_amax()
            module.enable_quant()
            module.disable_calib()
        else:
            module.enable()
    assert model[0]._input_quantizer.amax is not None  # NVIDIA's got a static amax
    granq = model[2]._input_quantizer
    assert granq.amax is None and "_amax" not in granq._buffers and not granq._disabled
    seen = []
    granq.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0], output)))
    model(torch.randn(2, 3, 8, 8) * 50)
    (inputs, output), = seen
    assert torch.equal(output, reference_granq(inputs, 4))


# ----------------------------------------------------------------------------- quant modules
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_quant_module_forward_and_ste_backward(kind):
    torch.manual_seed(2)
    if kind == "conv":
        module = quant_nn.QuantConv2d(3, 5, 3, padding=1, quant_desc_weight=QuantDescriptor(num_bits=4, axis=(0,)))
        x = torch.randn(2, 3, 6, 6, requires_grad=True)
        op = lambda inp, w: F.conv2d(inp, w, module.bias, padding=1)  # noqa: E731
    else:
        module = quant_nn.QuantLinear(6, 4, quant_desc_weight=QuantDescriptor(num_bits=4, axis=(0,)))
        x = torch.randn(5, 6, requires_grad=True)
        op = lambda inp, w: F.linear(inp, w, module.bias)  # noqa: E731
    gq.replace_input_quantizers(module, GranQDescriptor(num_bits=3, **EAGER))
    assert isinstance(module._input_quantizer, GranQTensorQuantizer)
    out = module(x)
    x_hat = reference_granq(x.detach(), 3).requires_grad_()
    w_hat = nvidia_weight_fake_quant(module.weight.detach(), 4)
    expected = op(x_hat, w_hat)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected.backward(grad_out)
    # straight-through: dL/dx equals dL/dx_hat exactly
    torch.testing.assert_close(x.grad, x_hat.grad, rtol=1e-6, atol=1e-7)
    assert module.weight.grad is not None and bool(module.weight.grad.abs().sum() > 0)


def test_initialize_and_deactivate_restore_torch_nn_exactly():
    names = ("Conv1d", "Conv2d", "Conv3d", "Linear", "AvgPool2d", "AdaptiveAvgPool2d", "MaxPool2d")
    originals = {name: getattr(torch.nn, name) for name in names}
    gq.initialize(GranQDescriptor(num_bits=3, **EAGER))
    try:
        assert torch.nn.Conv2d is gq.GranQConv2d and torch.nn.Linear is gq.GranQLinear
        assert torch.nn.AvgPool2d is originals["AvgPool2d"]  # not patched by default
        conv = torch.nn.Conv2d(3, 8, 3, dtype=torch.float64)
        linear = torch.nn.Linear(8, 2)
    finally:
        gq.deactivate()
    for name, original in originals.items():
        assert getattr(torch.nn, name) is original, name
    assert type(torch.nn.Conv2d(1, 1, 1)) is originals["Conv2d"]
    assert isinstance(conv._input_quantizer, GranQTensorQuantizer) and conv._input_quantizer.num_bits == 3
    assert conv.weight.dtype == torch.float64
    # weights: pytorch-quantization's per-output-channel quantizer with the input's bits
    assert type(conv._weight_quantizer) is quant_nn.TensorQuantizer
    assert conv._weight_quantizer.axis == (0,) and conv._weight_quantizer.num_bits == 3
    assert linear._weight_quantizer.axis == (0,)
    with pytest.raises(RuntimeError, match="without a matching initialize"):
        gq.deactivate()


def test_context_manager_nests_restores_on_error_and_patches_pooling():
    conv_original, pool_original = torch.nn.Conv2d, torch.nn.AvgPool2d
    with pytest.raises(KeyError):
        with gq.granq_quant_modules(GranQDescriptor(num_bits=4, **EAGER), modules=("Conv2d", "AvgPool2d")):
            outer = torch.nn.Conv2d(1, 1, 1)
            with gq.granq_quant_modules(GranQDescriptor(num_bits=2, **EAGER), QuantDescriptor(num_bits=8, axis=(0,))):
                inner = torch.nn.Conv2d(1, 1, 1)
                assert torch.nn.AvgPool2d is gq.GranQAvgPool2d
            after_inner = torch.nn.Conv2d(1, 1, 1)
            pool = torch.nn.AvgPool2d(2)
            raise KeyError("boom")
    assert torch.nn.Conv2d is conv_original and torch.nn.AvgPool2d is pool_original
    assert outer._input_quantizer.num_bits == 4 and after_inner._input_quantizer.num_bits == 4
    assert inner._input_quantizer.num_bits == 2 and inner._weight_quantizer.num_bits == 8
    assert isinstance(pool._input_quantizer, GranQTensorQuantizer)
    assert "default_quant_desc_input" not in gq.GranQConv2d.__dict__  # class defaults restored too
    with pytest.raises(ValueError, match="cannot patch"):
        gq.initialize(modules=("LSTM",))
    assert torch.nn.Conv2d is conv_original


def test_granq_weight_descriptor_gives_granq_weight_quantizer():
    with gq.granq_quant_modules(GranQDescriptor(num_bits=4, **EAGER),
                                GranQDescriptor(num_bits=4, granularity="channel", axis=0, **EAGER)):
        conv = torch.nn.Conv2d(2, 3, 3)
    w = conv.weight.detach()
    theirs = GranQFakeQuantize(bits=4, granularity="channel", ch_axis=0, fused=False, dtype=torch.qint8)
    assert torch.equal(conv._weight_quantizer(w), theirs(w))


# ----------------------------------------------------------------------------- placement
def _resnet20(builder_context):
    from pytorchcv.model_provider import get_model
    with builder_context:
        return get_model("resnet20_cifar10", pretrained=False)


class _FastCallerCheck:
    """pytorch-quantization's init_quantizer checks ``inspect.stack()[1].function == "__init__"``;
    inspect.stack() reads the source of every frame (seconds under pytest for 23 modules).
    Same check, answered from the frame objects only."""

    @staticmethod
    def stack():
        return [None, types.SimpleNamespace(function=sys._getframe(2).f_code.co_name)]


class _NvidiaQuantModules:
    """pytorch-quantization's own quant_modules.initialize() / deactivate()."""

    def __init__(self, monkeypatch):
        monkeypatch.setattr(quant_nn_utils, "inspect", _FastCallerCheck)

    def __enter__(self):
        quant_modules.initialize()

    def __exit__(self, *exc):
        quant_modules.deactivate()


def test_resnet20_after_relu_placement_counted_by_hand(monkeypatch):
    """pytorchcv resnet20: init conv (image input) + 9 units x (conv1, conv2) + 2 identity 1x1
    convs = 21 convs, then AvgPool2d(8) and Linear. Inputs that are ReLU outputs: every
    unit's conv1 (9: the init block's or previous unit's ReLU), every conv2 (9: conv1's ReLU),
    both identity convs (2: the previous unit's ReLU) = 20 convs, plus the final pool (the last
    unit's ReLU). Not: the image conv and the Linear (fed by the pool)."""
    model = _resnet20(_NvidiaQuantModules(monkeypatch))
    assert len(gq.quant_modules_with_input_quantizer(model)) == 23  # 21 conv + pool + linear
    model.train()
    bn = model.features.init_block.bn
    running_mean = bn.running_mean.clone()
    replaced = gq.replace_input_quantizers(model, GranQDescriptor(num_bits=4, **EAGER), only_after_relu=True,
                                           example_inputs=torch.randn(2, 3, 32, 32), disable_others=True)
    assert model.training and torch.equal(bn.running_mean, running_mean)  # the pass had no side effects
    convs = [name for name in replaced if name.endswith(".conv")]
    assert len(convs) == 20 and len(replaced) == 21
    assert sum(name.endswith("body.conv1.conv") for name in replaced) == 9
    assert sum(name.endswith("body.conv2.conv") for name in replaced) == 9
    assert sum(name.endswith("identity_conv.conv") for name in replaced) == 2
    assert "features.final_pool" in replaced
    assert "features.init_block.conv" not in replaced and "output" not in replaced
    assert model.features.init_block.conv._input_quantizer._disabled
    assert model.output._input_quantizer._disabled
    granq = [m for m in model.modules() if isinstance(m, GranQTensorQuantizer)]
    assert len(granq) == 21
    # weight quantizers untouched (pytorch-quantization's, per output channel)
    assert type(model.features.stage1.unit1.body.conv1.conv._weight_quantizer) is quant_nn.TensorQuantizer
    # every GranQ quantizer sees a ReLU output (>= 0) and quantizes it per (n, c)
    seen = []
    for quantizer in granq:
        quantizer.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    model.eval()(torch.randn(2, 3, 32, 32))
    assert len(seen) == 21
    for inputs, output in seen:
        assert bool((inputs >= 0).all())
        assert torch.equal(output, reference_granq(inputs, 4))


def test_resnet20_built_in_granq_context():
    model = _resnet20(gq.granq_quant_modules(GranQDescriptor(num_bits=4, **EAGER)))
    assert len([m for m in model.modules() if isinstance(m, GranQTensorQuantizer)]) == 22  # 21 conv + linear
    relu_fed = gq.find_relu_fed_modules(model, torch.randn(2, 3, 32, 32))
    assert len(relu_fed) == 20 and "features.init_block.conv" not in relu_fed and "output" not in relu_fed


def test_relu_detection_follows_data_flow():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = quant_nn.QuantConv2d(3, 4, 1)   # image input: no
            self.b = quant_nn.QuantConv2d(4, 4, 1)   # functional relu: yes
            self.c = quant_nn.QuantConv2d(4, 4, 1)   # relu then in-place add: no
            self.d = quant_nn.QuantConv2d(4, 4, 1)   # nn.ReLU6 (hardtanh 0..6): yes
            self.e = quant_nn.QuantLinear(16, 2)     # relu then flatten: no
            self.f = quant_nn.QuantLinear(16, 2)     # in-place tensor.relu_() on a flat tensor: yes
            self.relu6 = torch.nn.ReLU6()

        def forward(self, x):
            y = self.a(x)
            y = self.b(F.relu(y))
            r = torch.relu(y)
            r += 1.0
            y = self.c(r)
            y = self.d(self.relu6(y))
            flat = y.flatten(1)[:, :16]
            self.e(torch.relu(flat).reshape(-1, 16))
            return self.f(flat.clone().relu_())

    assert gq.find_relu_fed_modules(Net(), torch.randn(2, 3, 2, 2)) == ["b", "d", "f"]
    with pytest.raises(ValueError, match="example_inputs"):
        gq.replace_input_quantizers(Net(), only_after_relu=True)


# ----------------------------------------------------------------------------- state
def _small_model():
    with gq.granq_quant_modules(GranQDescriptor(num_bits=3, **EAGER)):
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))


def test_state_dict_round_trip_on_cpu():
    torch.manual_seed(3)
    model = _small_model()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, map_location="cpu", weights_only=True)
    quantizer_keys = [key for key in state if "_input_quantizer" in key]
    assert quantizer_keys and all(key.endswith("._extra_state") for key in quantizer_keys)  # settings, no ranges
    fresh = _small_model()
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(fresh(x), model(x))
    # whole-module pickling works too (module-level classes)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), model(x))


def test_checkpoint_amax_is_dropped_without_cuda():
    """A checkpoint from a calibrated pytorch-quantization model holds `_amax`; 2.1.3 would call
    .cuda() on it while loading. GranQ quantizers drop it (warning) and work on CPU."""
    model = _small_model()
    state = model.state_dict()
    state["0._input_quantizer._amax"] = torch.tensor(3.0)
    with pytest.warns(GranQCalibrationWarning, match="ignoring '0._input_quantizer._amax'"):
        result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert model[0]._input_quantizer.amax is None
    x = torch.randn(2, 3, 6, 6) * 10
    assert torch.equal(model[0]._input_quantizer(x), reference_granq(x, 3))


def test_load_quant_state_dict_for_calibrated_nvidia_quantizers_on_cpu():
    source = quant_nn.QuantConv2d(3, 4, 3, quant_desc_weight=QuantDescriptor(num_bits=8, axis=(0,)))
    source._weight_quantizer.amax = [1.0, 2.0, 3.0, 4.0]  # as after calibration
    state = source.state_dict()
    target = quant_nn.QuantConv2d(3, 4, 3, quant_desc_weight=QuantDescriptor(num_bits=8, axis=(0,)))
    if not torch.cuda.is_available():  # the 2.1.3 behaviour this helper works around
        with pytest.raises((RuntimeError, AssertionError)):
            copy.deepcopy(target).load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gq.load_quant_state_dict(target, state)
    assert torch.equal(target._weight_quantizer.amax, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert target._weight_quantizer.amax.device.type == "cpu"


# ----------------------------------------------------------------------------- vs torch.ao
@pytest.mark.numerics
def test_small_conv_net_same_numbers_as_torch_ao_path():
    """The same float model quantized through this adapter and through torch.ao FX QAT
    (paper placement, GranQ per-output-channel weights) gives bit-identical outputs."""
    torch.manual_seed(4)

    def build():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                   torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))

    float_model = build()
    x = torch.randn(4, 3, 8, 8)
    with gq.granq_quant_modules(GranQDescriptor(num_bits=4, **EAGER),
                                GranQDescriptor(num_bits=4, granularity="channel", axis=0, **EAGER)):
        nvidia = build()
    nvidia.load_state_dict(float_model.state_dict())
    replaced = gq.replace_input_quantizers(nvidia, GranQDescriptor(num_bits=4, **EAGER), only_after_relu=True,
                                           example_inputs=x, disable_others=True)
    assert replaced == ["2", "4"]
    mapping = granq_ao.get_granq_qat_qconfig_mapping(4, 4, weight_granularity="channel", act_placement="paper",
                                                     fused=False)
    ao = granq_ao.prepare_qat_fx(copy.deepcopy(float_model).train(), mapping, (x,))
    out_ao, out_nvidia = ao(x), nvidia(x)
    assert torch.equal(out_ao, out_nvidia)
    assert not torch.equal(out_nvidia, float_model(x))  # quantization did happen
