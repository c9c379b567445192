"""granq_ao.convert_to_reference_fx: dynamic (QAT-equal) and static exports, vs torch.ao's own."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.ao.quantization import QConfig, get_default_qat_qconfig_mapping
from torch.ao.quantization.fake_quantize import FakeQuantize
from torch.ao.quantization.observer import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver
from torch.ao.quantization.quantize_fx import _convert_to_reference_decomposed_fx
from torch.ao.quantization.quantize_fx import convert_to_reference_fx as torch_convert_to_reference_fx
from torch.ao.quantization.quantize_fx import prepare_qat_fx as torch_prepare_qat_fx

import granq_ao
from granq_ao import functional as F
from granq_ao.integrations.torch_ao.convert import ConvBnEval, weight_codes
from granq_ao.zsq.data import shared_data_dir

pytorchcv = pytest.importorskip("pytorchcv.model_provider")

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def resnet20(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return pytorchcv.get_model("resnet20_cifar10", pretrained=False)


def granq_qat(model, example, **mapping_kwargs):
    mapping_kwargs.setdefault("fused", False)
    mapping = granq_ao.get_granq_qat_qconfig_mapping(**mapping_kwargs)
    return granq_ao.prepare_qat_fx(model.train(), mapping, (example,))


def native_qconfig(bits: int, weight=None) -> QConfig:
    """torch.ao's QAT qconfig at ``bits``: per-tensor affine activations (moving-average min/max,
    averaging 0.01), per-channel symmetric weights unless ``weight`` is given."""
    activation = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0,
                                        quant_max=2**bits - 1, dtype=torch.quint8,
                                        qscheme=torch.per_tensor_affine, averaging_constant=0.01)
    if weight is None:
        weight = FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver,
                                        quant_min=-(2 ** (bits - 1)), quant_max=2 ** (bits - 1) - 1,
                                        dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    return QConfig(activation=activation, weight=weight)


def native_qat(model, example, bits: int, weight=None):
    mapping = get_default_qat_qconfig_mapping("x86").set_global(native_qconfig(bits, weight))
    return torch_prepare_qat_fx(model.train(), mapping, (example,))


def quantize_inputs(graph_module) -> list:
    """Names of the nodes after which torch's static converter put a quantize op, in order."""
    targets = (torch.quantize_per_tensor, torch.quantize_per_channel)
    return [n.args[0].name for n in graph_module.graph.nodes if n.op == "call_function" and n.target in targets]


def dynamic_quantize_inputs(graph_module) -> list:
    """Names of the nodes a dynamic quantize op reads: its own qparams, or (a shared call, e.g.
    ResNet's avgpool and view outputs) its first call's (tests/test_shared_quantizers.py)."""
    targets = (torch.ops.granq_ao.choose_qparams_dynamic.default, torch.ops.granq_ao.fake_quantize_shared.default)
    return [n.args[0].name for n in graph_module.graph.nodes if n.op == "call_function" and n.target in targets]


# ----------------------------------------------------------------------------- dynamic == QAT eval
CASES = [  # (act_placement, act_granularity, weight_granularity)
    ("all", "granq", "channel"),
    ("all", "channel", "kernel"),
    ("all", "tensor", "channel"),
    ("paper", "granq", "kernel"),
    ("paper", "channel", "channel"),
    ("paper", "tensor", "kernel"),
]


@pytest.mark.numerics
@pytest.mark.parametrize("placement,act,weight", CASES)
def test_dynamic_reference_equals_qat_eval_resnet20(placement, act, weight):
    torch.manual_seed(1)
    qat = granq_qat(resnet20(), torch.randn(2, 3, 32, 32), weight_bits=3, act_bits=3,
                    act_granularity=act, weight_granularity=weight, act_placement=placement)
    with torch.no_grad():
        qat(torch.randn(2, 3, 32, 32))  # moves BN running stats and observers
    qat.eval()
    x = torch.randn(2, 3, 32, 32) * 1.5
    with torch.no_grad():
        expected = qat(x)
    ref = granq_ao.convert_to_reference_fx(copy.deepcopy(qat))
    with torch.no_grad():
        got = ref(x)
    assert torch.equal(got, expected), (got - expected).abs().max()
    # the reference graph holds no fake-quant module and no QAT module any more
    kinds = {type(m).__module__ for m in ref.modules()}
    assert not any("qat" in k or "fake_quantize" in k for k in kinds), kinds
    n_points = len(dynamic_quantize_inputs(ref))
    assert n_points == (19 if placement == "paper" else 34)
    assert sum(isinstance(m, ConvBnEval) for m in ref.modules()) == 21  # stem + 18 body convs + 2 shortcuts


@pytest.mark.numerics
def test_dynamic_nodes_compute_integer_codes_and_match_fake_quantize():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    qat = granq_qat(model, torch.randn(2, 3, 8, 8), weight_bits=4, act_bits=4)
    qat.eval()
    ref = granq_ao.convert_to_reference_fx(copy.deepcopy(qat))
    quantize_nodes = [n for n in ref.graph.nodes if n.op == "call_function" and n.target is torch.ops.granq_ao.quantize.default]
    dequantize_nodes = [n for n in ref.graph.nodes if n.op == "call_function" and n.target is torch.ops.granq_ao.dequantize.default]
    assert len(quantize_nodes) == len(dequantize_nodes) == 2  # input and conv-relu output
    codes, dequantized = {}, {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node in quantize_nodes:
                codes[node.name] = out
            if node in dequantize_nodes:
                dequantized[node.name] = out
            return out

    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        out = Recorder(ref).run(x)
    for value in codes.values():
        assert value.dtype == torch.uint8 and int(value.max()) <= 15
    # the input's q/dq equals GranQ's formula written out here: per (n, c) over space
    x_min, x_max = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    s = (x_max - x_min) / 15
    z = torch.round(-x_min / s)
    x_codes = torch.clamp(torch.round(x / s + z), 0, 15)
    x_hat = (x_codes - z) * s
    first_q, first_dq = quantize_nodes[0].name, dequantize_nodes[0].name  # graph order: the input's
    assert torch.equal(codes[first_q], x_codes.to(torch.uint8))
    assert torch.allclose(dequantized[first_dq], x_hat, rtol=0, atol=1e-6)
    with torch.no_grad():
        first_conv = ref.get_submodule("0")
        expected_out = qat.get_submodule("0")(x_hat)  # the QAT module on the formula's input
        assert torch.allclose(first_conv(x_hat), expected_out, atol=1e-6)
        assert torch.equal(out, qat(x))


def test_baked_weights_are_fake_quantized_and_round_trip_to_codes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    qat = granq_qat(model, torch.randn(2, 4, 6, 6), weight_bits=3, act_bits=4, weight_granularity="kernel")
    with torch.no_grad():
        qat(torch.randn(8, 4, 6, 6))
    qat.eval()
    ref = granq_ao.convert_to_reference_fx(copy.deepcopy(qat))
    conv_bn = ref.get_submodule("0")
    assert isinstance(conv_bn, ConvBnEval)
    qat_conv = qat.get_submodule("0")
    sf = qat_conv.bn.weight / torch.sqrt(qat_conv.bn.running_var + qat_conv.bn.eps)
    w = (qat_conv.weight * sf.reshape(-1, 1, 1, 1)).detach()
    # 'kernel': one range per (out, in) slice, formula written out here
    w_min, w_max = w.amin(dim=(2, 3), keepdim=True), w.amax(dim=(2, 3), keepdim=True)
    s = (w_max - w_min) / 7
    z = torch.round(-w_min / s)
    w_hat = (torch.clamp(torch.round(w / s + z), 0, 7) - z) * s
    assert torch.allclose(conv_bn.layer.weight, w_hat, atol=1e-6)
    codes = weight_codes(conv_bn)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 7
    assert torch.equal(F.dequantize(codes, conv_bn.layer.weight_scale, conv_bn.layer.weight_zero_point),
                       conv_bn.layer.weight)
    x = torch.randn(3, 4, 6, 6)
    with torch.no_grad():
        assert torch.equal(ref(x), qat(x))
    # folded BN (deployment form): a plain conv, same numbers up to float rounding
    folded = granq_ao.convert_to_reference_fx(copy.deepcopy(qat), fold_bn=True)
    assert type(folded.get_submodule("0")[0]) is nn.Conv2d  # ConvReLU2d(Conv2d, ReLU)
    with torch.no_grad():
        pre_act = folded.get_submodule("0")(x)
        expected = qat.get_submodule("0")(x)
    assert torch.allclose(pre_act, expected, atol=1e-5)


def test_disabled_fake_quant_is_removed():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    qat = granq_qat(model, torch.randn(2, 3, 8, 8))
    qat.apply(torch.ao.quantization.disable_fake_quant)
    qat.eval()
    x = torch.randn(2, 3, 8, 8)
    for mode in ("dynamic", "static"):
        ref = granq_ao.convert_to_reference_fx(copy.deepcopy(qat), mode=mode)
        assert dynamic_quantize_inputs(ref) == [] and quantize_inputs(ref) == []
        with torch.no_grad():
            assert torch.allclose(ref(x), qat(x), atol=1e-6)


@pytest.mark.parametrize("act", ["granq", "channel", "tensor", "granq_iterative"])
def test_dynamic_reference_refuses_nan_and_passes_empty_batch(act):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    qat = granq_qat(model, torch.randn(2, 3, 8, 8), act_granularity=act)
    qat(torch.randn(2, 3, 8, 8))
    ref = granq_ao.convert_to_reference_fx(copy.deepcopy(qat).eval())
    x = torch.randn(2, 3, 8, 8)
    x[1, 2, 3, 4] = float("nan")
    with pytest.raises(F.NonFiniteInputError, match="NaN or infinite"):
        ref(x)
    empty = torch.randn(0, 3, 8, 8)
    assert ref(empty).shape == (0, 5) and qat.eval()(empty).shape == (0, 5)


def test_dynamic_reference_follows_check_finite_off():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    qat = granq_qat(model, torch.randn(2, 3, 8, 8), check_finite=False)
    ref = granq_ao.convert_to_reference_fx(copy.deepcopy(qat).eval())
    x = torch.randn(2, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    assert torch.isnan(ref(x)).any() and torch.isnan(qat.eval()(x)).any()  # opted out: NaN in, NaN out


def test_mode_is_validated():
    qat = granq_qat(nn.Sequential(nn.Conv2d(3, 4, 3)), torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="mode must be one of"):
        granq_ao.convert_to_reference_fx(qat, mode="lowered")
    with pytest.raises(TypeError, match="GraphModule"):
        granq_ao.convert_to_reference_fx(nn.Conv2d(3, 4, 3))


def test_torch_decomposed_converter_calls_the_convert_hook():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))
    qat = granq_qat(model, torch.randn(2, 3, 8, 8), weight_bits=4, act_bits=4)
    with torch.no_grad():
        qat(torch.randn(2, 3, 8, 8))  # torch's decomposed QAT path reads the weight observers as they are
    qat.eval()
    ref = _convert_to_reference_decomposed_fx(copy.deepcopy(qat))
    assert len(dynamic_quantize_inputs(ref)) == 3  # GranQFakeQuantize.convert ran for each call
    ours = granq_ao.convert_to_reference_fx(copy.deepcopy(qat))
    assert dynamic_quantize_inputs(ref) == dynamic_quantize_inputs(ours)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        # weights there are torch's decomposed reference weights (static observer qparams,
        # ranges widened to 0): not QAT's; ours are
        assert torch.isfinite(ref(x)).all()
        assert torch.equal(ours(x), qat(x))


# ----------------------------------------------------------------------------- positions vs torch.ao
def test_quantize_points_match_torch_native_per_tensor():
    example = torch.randn(2, 3, 32, 32)
    granq = granq_qat(resnet20(), example, weight_bits=8, act_bits=8)
    native = torch_prepare_qat_fx(resnet20().train(), get_default_qat_qconfig_mapping("x86"), (example,))
    with torch.no_grad():
        granq(example)
        native(example)
    native_points = quantize_inputs(torch_convert_to_reference_fx(copy.deepcopy(native.eval())))
    granq_static = granq_ao.convert_to_reference_fx(copy.deepcopy(granq.eval()), mode="static")
    granq_torch = torch_convert_to_reference_fx(copy.deepcopy(granq))  # torch's own, unchanged
    granq_dynamic = granq_ao.convert_to_reference_fx(copy.deepcopy(granq))
    assert len(native_points) == 34
    assert quantize_inputs(granq_static) == native_points
    assert quantize_inputs(granq_torch) == native_points
    assert dynamic_quantize_inputs(granq_dynamic) == native_points


# ----------------------------------------------------------------------------- static export
def test_static_shared_fake_quant_across_flatten_falls_back_to_per_tensor():
    class ConvFlattenLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.relu, self.pool = nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2)
            self.linear = nn.Linear(4 * 3 * 3, 5)

        def forward(self, x):  # maxpool and torch.flatten reuse the ReLU output's fake-quant
            return self.linear(torch.flatten(self.pool(self.relu(self.conv(x))), 1))

    torch.manual_seed(0)
    qat = granq_qat(ConvFlattenLinear(), torch.randn(2, 3, 8, 8), weight_bits=4, act_bits=4)
    with torch.no_grad():
        for _ in range(3):
            qat(torch.randn(4, 3, 8, 8))
    qat.eval()
    shared = [m for m in qat.modules() if isinstance(m, granq_ao.GranQFakeQuantize)
              and m.activation_post_process.channel_mismatch]
    assert shared, "the flatten did not share the ReLU's fake-quant"
    scale, zero_point = shared[0].calculate_qparams()
    assert scale.numel() == 1
    # what a per-channel static export of that instance would do on the flattened tensor
    with pytest.raises(RuntimeError, match="length of scales must equal to channel"):
        torch.quantize_per_channel(torch.randn(2, 36), torch.ones(4), torch.zeros(4, dtype=torch.long), 1,
                                   torch.quint8)
    ref = granq_ao.convert_to_reference_fx(copy.deepcopy(qat), mode="static")
    kinds = [n.target for n in ref.graph.nodes if n.op == "call_function"
             and n.target in (torch.quantize_per_tensor, torch.quantize_per_channel)]
    assert torch.quantize_per_tensor in kinds and torch.quantize_per_channel in kinds
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = ref(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    # torch's own converter on the same model runs too
    with torch.no_grad():
        torch_convert_to_reference_fx(copy.deepcopy(qat))(x)


def test_static_qparams_equal_per_tensor_when_every_channel_has_the_same_range():
    """Every channel of every batch spans the same [lo, hi] (0 inside): GranQ's running
    per-channel static qparams equal torch.ao's per-tensor ones, and both exports agree."""
    channels, bits = 4, 4

    def batch(lo, hi, n=3):
        x = torch.rand(n, channels, 5, 5) * (hi - lo) + lo
        x[:, :, 0, 0], x[:, :, 4, 4] = lo, hi  # every (n, c) reaches both ends
        return x

    def identity_conv():
        conv = nn.Conv2d(channels, channels, 1, bias=False)
        with torch.no_grad():
            conv.weight.copy_(torch.eye(channels).reshape(channels, channels, 1, 1))
        return nn.Sequential(conv)

    granq_weight = granq_ao.get_granq_qconfig(bits, bits, fused=False).weight
    example = batch(-1.0, 2.0)
    granq = granq_qat(identity_conv(), example, weight_bits=bits, act_bits=bits)
    native = native_qat(identity_conv(), example, bits, weight=granq_weight)
    torch.manual_seed(3)
    for model in (granq, native):  # observe only: both conv outputs then equal their inputs
        model.apply(torch.ao.quantization.disable_fake_quant)
    with torch.no_grad():
        for lo, hi in [(-1.0, 2.0), (-0.5, 3.0), (-2.0, 1.0), (-0.25, 0.75)]:
            x = batch(lo, hi)
            granq(x)
            native(x)
    for model in (granq, native):
        model.apply(torch.ao.quantization.enable_fake_quant)
    granq_fqs = [m for n, m in granq.named_children() if n.startswith("activation_post_process")]
    native_fqs = [m for n, m in native.named_children() if n.startswith("activation_post_process")]
    assert len(granq_fqs) == len(native_fqs) == 2
    for g, n in zip(granq_fqs, native_fqs):
        g_scale, g_zp = g.calculate_qparams()
        n_scale, n_zp = n.calculate_qparams()
        assert g_scale.numel() == channels  # per channel ...
        assert torch.equal(g_scale, n_scale.expand(channels)) and torch.equal(g_zp, n_zp.long().expand(channels))
    ref_granq = granq_ao.convert_to_reference_fx(copy.deepcopy(granq.eval()), mode="static")
    ref_native = torch_convert_to_reference_fx(copy.deepcopy(native.eval()))
    assert torch.quantize_per_channel in [n.target for n in ref_granq.graph.nodes]
    x = batch(-3.0, 4.0)  # beyond the observed ranges: clamping agrees too
    with torch.no_grad():
        assert torch.equal(ref_granq(x), ref_native(x))


# ----------------------------------------------------------------------------- real teacher, real images
def _real_cifar10():
    data_dir = shared_data_dir()
    weights = data_dir / "weights" / "resnet20_cifar10.pth"
    images = data_dir / "cifar10" / "test_subset.npz"
    if not (weights.is_file() and images.is_file()):
        pytest.skip(f"real CIFAR-10 teacher/images not found under {data_dir} "
                    f"(expected {weights} and {images}; set GRANQ_DATA_DIR)")
    teacher = pytorchcv.get_model("resnet20_cifar10", pretrained=False)
    teacher.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    with np.load(images) as arrays:
        x = torch.from_numpy(arrays["x"][:512]).permute(0, 3, 1, 2).float() / 255.0
        y = torch.from_numpy(arrays["y"][:512])
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return teacher.eval(), ((x - mean) / std).contiguous(), y


@torch.no_grad()
def _logits(model, images, batch=64):
    return torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)])


@pytest.mark.slow
def test_real_teacher_granq_reference_is_closer_to_fp_than_per_tensor(capsys):
    teacher, images, labels = _real_cifar10()
    calibration, evaluation, eval_labels = images[256:384], images[:256], labels[:256]
    bits = 4
    fp = _logits(teacher, evaluation)

    def calibrated(qat):
        qat.train()
        qat.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)  # BN keeps the teacher's statistics
        _logits(qat, calibration)  # observers get their running ranges
        return qat.eval()

    # same weight quantization on both sides (per-channel symmetric): only activations differ
    granq = calibrated(granq_qat(copy.deepcopy(teacher), images[:2], weight_bits=bits, act_bits=bits,
                                 symmetric_weights=True))
    native = calibrated(native_qat(copy.deepcopy(teacher), images[:2], bits))
    dynamic = granq_ao.convert_to_reference_fx(copy.deepcopy(granq))
    assert torch.equal(_logits(dynamic, evaluation[:64]), _logits(granq, evaluation[:64]))
    results = {
        "granq ref dynamic": _logits(dynamic, evaluation),
        "granq ref static": _logits(granq_ao.convert_to_reference_fx(copy.deepcopy(granq), mode="static"),
                                    evaluation),
        "per-tensor ref (torch)": _logits(torch_convert_to_reference_fx(copy.deepcopy(native)), evaluation),
    }
    mse = {k: float(((v - fp) ** 2).mean()) for k, v in results.items()}
    agree = {k: float((v.argmax(1) == fp.argmax(1)).float().mean()) for k, v in results.items()}
    acc = {k: float((v.argmax(1) == eval_labels).float().mean()) for k, v in results.items()}
    with capsys.disabled():
        print(f"\nW{bits}A{bits}, 256 real CIFAR-10 test images, FP top-1 "
              f"{float((fp.argmax(1) == eval_labels).float().mean()):.3f}")
        for k in results:
            print(f"  {k:24s} MSE vs FP {mse[k]:8.4f}  top-1 agreement {agree[k]:.3f}  top-1 {acc[k]:.3f}")
    assert mse["granq ref dynamic"] < mse["granq ref static"] < mse["per-tensor ref (torch)"]
    assert agree["granq ref dynamic"] >= agree["per-tensor ref (torch)"]


def test_dynamic_reference_model_pickles_and_loads_in_a_fresh_process(tmp_path):
    """The dynamic graph calls registered ops (torch.ops.granq_ao.*), so torch.save of the whole
    converted model loads again, here and in a new interpreter, with the same outputs."""
    import subprocess
    import sys

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3))
    qat = granq_qat(model, torch.randn(2, 3, 8, 8), weight_bits=4, act_bits=4).eval()
    ref = granq_ao.convert_to_reference_fx(qat)
    x = torch.randn(5, 3, 8, 8)
    expected = qat(x)
    path = tmp_path / "ref.pt"
    torch.save({"model": ref, "x": x, "expected": expected}, path)
    assert torch.equal(torch.load(path, weights_only=False)["model"](x), expected)
    code = ("import torch, granq_ao; d = torch.load(%r, weights_only=False); "
            "assert torch.equal(d['model'](d['x']), d['expected']); print('ok')" % str(path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
