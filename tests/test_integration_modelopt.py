"""granq_ao.integrations.modelopt against the real NVIDIA Model Optimizer (nvidia-modelopt 0.47)."""
import copy
import importlib
import io
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("modelopt")
gm = pytest.importorskip("granq_ao.integrations.modelopt")

import modelopt.torch.opt as mto  # noqa: E402
import modelopt.torch.quantization as mtq  # noqa: E402

import granq_ao  # noqa: E402
from granq_ao.config import GranQScheme  # noqa: E402
from granq_ao.functional import NonFiniteInputError  # noqa: E402
from granq_ao.zsq.teachers import get_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _eager_math(monkeypatch):
    monkeypatch.setenv("GRANQ_FUSED", "eager")  # same numbers as compiled; no compile time on CPU


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # modelopt's import/convert chatter (transformers missing, ...)
        yield


def quantize(model, placement="all", example_inputs=None, **options):
    options.setdefault("act_bits", 4)
    config = gm.granq_quant_cfg(4, act_placement=placement, fused="eager", model=model,
                                example_inputs=example_inputs, **options)
    return mtq.quantize(model, config, forward_loop=None)


def enabled(model, kind):
    """Names of the enabled GranQ quantizers of ``kind`` ("input" or "weight")."""
    return [name for name, module in model.named_modules()
            if name.endswith(f"{kind}_quantizer") and gm.is_granq_quantizer(module) and module.is_enabled]


def reference_granq(x, bits, dims):
    """Independent formula: ranges over ``dims``; s = (max - min) / (2^b - 1), z = round(-min / s),
    x_hat = s * (clamp(round(x / s + z), 0, 2^b - 1) - z); a constant slice passes unchanged."""
    x_min, x_max = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    s = (x_max - x_min) / (2 ** bits - 1)
    z = torch.round(-x_min / s)
    return torch.where(s > 0, s * (torch.clamp(torch.round(x / s + z), 0, 2 ** bits - 1) - z), x)


def resnet20():
    torch.manual_seed(0)
    return get_model("resnet20_cifar10")


def resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None)


CIFAR_X = torch.randn(2, 3, 32, 32)
IMAGENET_X = torch.randn(2, 3, 64, 64)


# ----------------------------------------------------------------------------- import hygiene
def test_missing_modelopt_gives_install_hint(monkeypatch):
    saved = {name: module for name, module in sys.modules.items()
             if name == "modelopt" or name.startswith("modelopt.")
             or name.startswith("granq_ao.integrations.modelopt")}
    try:
        for name in saved:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, "modelopt", None)  # import -> ImportError
        with pytest.raises(ImportError, match=r'pip install -e "\.\[modelopt\]"'):
            importlib.import_module("granq_ao.integrations.modelopt")
    finally:
        monkeypatch.undo()
        sys.modules.update(saved)
    assert importlib.import_module("granq_ao.integrations.modelopt") is gm


# ----------------------------------------------------------------------------- the config
def test_config_is_modelopt_list_form_and_validates():
    config = gm.granq_quant_cfg(3, act_bits=5)
    assert config["algorithm"] is None and isinstance(config["quant_cfg"], list)
    mtq.config.QuantizeConfig(**config)  # modelopt's own schema accepts it
    by_name = {entry["quantizer_name"]: entry for entry in config["quant_cfg"] if "cfg" in entry}
    weight, act = by_name["*weight_quantizer"]["cfg"], by_name["*input_quantizer"]["cfg"]
    assert weight["backend"] == act["backend"] == gm.BACKEND == "granq"
    assert act["backend_extra_args"] == {"role": "activation", "bits": 5, "granularity": "granq",
                                         "symmetric": False, "fused": "auto", "check_finite": True}
    assert weight["backend_extra_args"]["bits"] == 3 and weight["backend_extra_args"]["granularity"] == "channel"
    assert gm.config_from_args(weight["backend_extra_args"]) == granq_ao.GranQConfig.for_weight(3)
    scheme = GranQScheme.from_kwargs(3, 5)
    assert gm.granq_quant_cfg(scheme) == config


@pytest.mark.parametrize("symmetric", [False, True])
def test_backend_args_round_trip_every_granularity(symmetric):
    for name in granq_ao.ACT_GRANULARITIES:
        config = granq_ao.GranQConfig.for_activation(3, name, symmetric=symmetric, fused="eager")
        assert gm.config_from_args(gm.backend_args(config, "activation")) == config
    for name in granq_ao.WEIGHT_GRANULARITIES:
        config = granq_ao.GranQConfig.for_weight(5, name, symmetric=symmetric, check_finite=False)
        assert gm.config_from_args(gm.backend_args(config, "weight")) == config


def test_bad_options_are_refused_with_clear_errors():
    with pytest.raises(ValueError, match=r"act_bits must be an integer in \[2, 8\]"):
        gm.granq_quant_cfg(4, act_bits=9)
    with pytest.raises(ValueError, match="act_granularity must be one of"):
        gm.granq_quant_cfg(4, act_granularity="kernel")
    with pytest.raises(ValueError, match="weight_granularity must be one of"):
        gm.granq_quant_cfg(4, weight_granularity="granq")
    with pytest.raises(ValueError, match="act_placement must be one of all, paper"):
        gm.granq_quant_cfg(4, act_placement="relu")
    with pytest.raises(ValueError, match="both a GranQScheme and the keyword option\\(s\\) act_bits:"):
        gm.granq_quant_cfg(GranQScheme(), act_bits=3)
    with pytest.raises(ValueError, match="needs model= and example_inputs="):
        gm.granq_quant_cfg(4, act_placement="paper")
    with pytest.raises(ValueError, match="unknown"):
        gm.config_from_args({"role": "activation", "bits": 4, "axis": 2})
    with pytest.raises(ValueError, match="role must be one of activation, weight"):
        gm.config_from_args({"role": "bias", "bits": 4})


def test_bad_backend_args_at_run_time_name_the_quantizer():
    model = quantize(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1)))
    model[2].input_quantizer.backend_extra_args = {"role": "activation", "bits": 12}
    with pytest.raises(ValueError, match=r"TensorQuantizer '2\.input_quantizer'.*bits must be an integer"):
        model(torch.randn(2, 3, 4, 4))


# ----------------------------------------------------------------------------- placement counts
def test_resnet20_quantizer_counts_for_both_placements():
    """pytorchcv resnet20: 21 convs (init + 9 units x 2 + 2 identity 1x1), AvgPool2d(8), Linear.
    all: every conv/pool/linear input (23), every conv/linear weight (22).
    paper: inputs that are ReLU outputs: 9 body.conv1 + 9 body.conv2 + 2 identity_conv + the final
    pool = 21 quantizers over the official code's 19 ReLU outputs; not the image conv, not the Linear."""
    model = quantize(resnet20())
    assert len(enabled(model, "input")) == 23 and len(enabled(model, "weight")) == 22
    assert not any("bn" in name for name in enabled(model, "input"))  # BatchNorm inputs stay float

    paper = resnet20()
    paper = quantize(paper, "paper", CIFAR_X)
    inputs = enabled(paper, "input")
    assert len(inputs) == 21 and len(enabled(paper, "weight")) == 22
    assert sum(name.endswith("body.conv1.conv.input_quantizer") for name in inputs) == 9
    assert sum(name.endswith("body.conv2.conv.input_quantizer") for name in inputs) == 9
    assert sum(name.endswith("identity_conv.conv.input_quantizer") for name in inputs) == 2
    assert "features.final_pool.input_quantizer" in inputs
    assert "features.init_block.conv.input_quantizer" not in inputs and "output.input_quantizer" not in inputs
    # the data-flow pass gives the same layers on the quantized model
    assert [f"{name}.input_quantizer" for name in gm.relu_fed_layers(paper, CIFAR_X)] == inputs
    seen = []  # every enabled input quantizer sees a ReLU output and quantizes it per (n, c)
    for name in inputs:
        paper.get_submodule(name).register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    paper(CIFAR_X)
    assert len(seen) == 21
    for x, out in seen:
        assert bool((x >= 0).all()) and torch.equal(out, reference_granq(x, 4, (2, 3)))


def test_resnet18_quantizer_counts_for_both_placements():
    """torchvision resnet18: 20 convs (conv1, 8 blocks x 2, 3 downsample), maxpool, avgpool, fc.
    all: 23 inputs, 21 weights. paper: maxpool (after the stem ReLU), every block's conv2, every
    conv1 but layer1.0's (fed by the maxpool, not a ReLU), the 3 downsample convs and avgpool = 20."""
    model = quantize(resnet18())
    assert len(enabled(model, "input")) == 23 and len(enabled(model, "weight")) == 21
    paper = quantize(resnet18(), "paper", IMAGENET_X)
    inputs = enabled(paper, "input")
    assert len(inputs) == 20 and len(enabled(paper, "weight")) == 21
    assert {"maxpool.input_quantizer", "avgpool.input_quantizer"} <= set(inputs)
    assert not {"conv1.input_quantizer", "layer1.0.conv1.input_quantizer", "fc.input_quantizer"} & set(inputs)
    assert sum(".downsample.0." in name for name in inputs) == 3
    assert paper(IMAGENET_X).shape == (2, 1000)


def test_forward_loop_none_and_calibration_leaves_ranges_dynamic():
    torch.manual_seed(1)
    float_model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    x = torch.randn(3, 3, 8, 8)
    plain = quantize(copy.deepcopy(float_model))  # forward_loop=None
    config = gm.granq_quant_cfg(4, act_bits=4, fused="eager")
    config["algorithm"] = "max"  # a user who calibrates anyway
    calibrated = mtq.quantize(copy.deepcopy(float_model), config, forward_loop=lambda m: m(x * 100))
    assert not any(hasattr(q, "_amax") for q in calibrated.modules() if gm.is_granq_quantizer(q))
    x_test = torch.randn(3, 3, 8, 8)
    assert torch.equal(plain(x_test), calibrated(x_test))
    assert not torch.equal(plain(x_test), float_model(x_test))


# ----------------------------------------------------------------------------- the numbers
def test_backend_matches_independent_formula_for_activations_and_weights():
    torch.manual_seed(2)
    conv = quantize(torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3)), act_bits=3)[0]
    x = torch.randn(4, 3, 7, 7)
    assert torch.equal(conv.input_quantizer(x), reference_granq(x, 3, (2, 3)))
    assert torch.equal(conv.weight_quantizer(conv.weight), reference_granq(conv.weight, 4, (1, 2, 3)))
    expected = F.conv2d(reference_granq(x, 3, (2, 3)), reference_granq(conv.weight, 4, (1, 2, 3)), conv.bias)
    assert torch.equal(conv(x), expected)
    linear = quantize(torch.nn.Sequential(torch.nn.Linear(5, 3)))[0]
    rows = torch.randn(4, 5)
    assert torch.equal(linear.input_quantizer(rows), reference_granq(rows, 4, (1,)))  # rank 2: per row


class ReluNet(torch.nn.Module):
    """No BatchNorm, no residual: the computation FX and modelopt quantize is the same. ReLU as a
    module, a function and ReLU6; an AdaptiveAvgPool2d and a Linear after a flatten."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.relu = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(8, 8, 1)
        self.relu6 = torch.nn.ReLU6()
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = self.relu6(self.conv3(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.mark.numerics
def test_same_numbers_as_torch_ao_fx_path_bit_for_bit():
    """The same float model, weights and inputs through torch.ao FX QAT (eval mode) and through
    modelopt, paper placement, W4A4 GranQ per-(n, c) activations and per-output-channel weights."""
    torch.manual_seed(4)
    float_model = ReluNet()
    x = torch.randn(4, 3, 8, 8) * 3
    ao = granq_ao.prepare_qat_fx(copy.deepcopy(float_model).train(), granq_ao.get_granq_qat_qconfig_mapping(
        4, 4, weight_granularity="channel", act_placement="paper", fused="eager"), (x,)).eval()
    assert granq_ao.count_activation_fake_quant_calls(ao) == 3
    mo = quantize(copy.deepcopy(float_model), "paper", x)
    assert enabled(mo, "input") == ["conv2.input_quantizer", "conv3.input_quantizer", "pool.input_quantizer"]
    for batch in (x, torch.randn(7, 3, 8, 8), torch.randn(2, 3, 5, 5) * 50):
        assert torch.equal(ao(batch), mo(batch))
    assert not torch.equal(mo(x), float_model(x))  # quantization did happen


def test_gradients_flow_straight_through():
    torch.manual_seed(5)
    model = quantize(resnet20())
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    model(x).square().sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and bool(torch.isfinite(parameter.grad).all()), name
    # STE: the input quantizer passes the gradient unchanged (no clipping mask) ...
    quantizer = model.features.stage1.unit1.body.conv1.conv.input_quantizer
    a = (torch.randn(2, 4, 5, 5) * 3).requires_grad_()
    g = torch.randn(2, 4, 5, 5)
    quantizer(a).backward(g)
    assert torch.equal(a.grad, g)
    # ... and the weight gets the gradient of the quantized weight
    conv = quantize(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))[0]
    inputs = torch.randn(2, 3, 6, 6)
    conv(inputs).square().sum().backward()
    w_hat = conv.weight_quantizer(conv.weight).detach().requires_grad_()
    F.conv2d(conv.input_quantizer(inputs), w_hat, conv.bias).square().sum().backward()
    assert torch.equal(conv.weight.grad, w_hat.grad)


def test_nan_and_inf_are_refused_with_the_quantizer_named():
    model = quantize(resnet20())
    x = CIFAR_X.clone()
    x[1, 0, 3, 3] = float("nan")
    with pytest.raises(NonFiniteInputError, match=r"'features\.init_block\.conv\.input_quantizer'"):
        model(x)
    x[1, 0, 3, 3] = float("inf")
    with pytest.raises(NonFiniteInputError, match="NaN or infinite"):
        model(x)


# ----------------------------------------------------------------------------- state
_RESTORE = textwrap.dedent("""
    import sys, torch, warnings
    warnings.simplefilter("ignore")
    import granq_ao, granq_ao.integrations
    from granq_ao.zsq.teachers import get_model
    assert "modelopt" not in sys.modules, "import granq_ao imported modelopt"
    import modelopt.torch.opt as mto
    directory = sys.argv[1]
    x, expected = torch.load(directory + "/io.pt")
    restored = mto.restore(get_model("resnet20_cifar10"), directory + "/model.pth")
    assert "granq_ao.integrations.modelopt" not in sys.modules
    try:  # the backend is restored by name: without the package imported it is unknown
        restored(x)
        raise SystemExit("forward without the backend registered should fail")
    except KeyError as error:
        assert "'granq' is not registered" in str(error), error
    import granq_ao.integrations.modelopt as gm
    assert torch.equal(restored(x), expected), "mto.restore"
    state = torch.load(directory + "/state.pt", weights_only=False)
    rebuilt = mto.restore_from_modelopt_state(get_model("resnet20_cifar10"), state["modelopt_state"])
    rebuilt.load_state_dict(state["model"])
    assert torch.equal(rebuilt(x), expected), "restore_from_modelopt_state"
    quantizers = [n for n, m in rebuilt.named_modules() if gm.is_granq_quantizer(m) and m.is_enabled]
    print(len(quantizers))
""")


def test_save_and_restore_in_a_fresh_process(tmp_path):
    """mto.save/restore and modelopt_state/restore_from_modelopt_state in a new process (which
    also checks, on the way, that ``import granq_ao`` does not import modelopt)."""
    model = quantize(resnet20(), "paper", CIFAR_X, act_bits=3)
    with torch.no_grad():  # change the weights: the restored model must carry them
        model.features.init_block.conv.weight.mul_(1.5)
    x = torch.randn(3, 3, 32, 32)
    expected = model(x).detach()
    mto.save(model, str(tmp_path / "model.pth"))
    torch.save({"modelopt_state": mto.modelopt_state(model), "model": model.state_dict()}, tmp_path / "state.pt")
    torch.save((x, expected), tmp_path / "io.pt")
    env = dict(os.environ, PYTHONPATH=str(REPO), GRANQ_FUSED="eager")
    result = subprocess.run([sys.executable, "-c", _RESTORE, str(tmp_path)], capture_output=True, text=True,
                            timeout=300, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "43"  # 21 inputs + 22 weights, paper placement


# ----------------------------------------------------------------------------- ONNX
def _onnxruntime_run(data, x):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(data)
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _op_types(data):
    onnx = pytest.importorskip("onnx")
    return {node.op_type for node in onnx.load_from_string(data).graph.node}


def test_onnx_export_computes_ranges_at_run_time_for_other_batch_sizes():
    """A shallow GranQ net (no BN): ONNX (exported at batch 2) equals PyTorch at batch 5 and at
    100x input scale to float rounding, with both exporters. Frozen ranges would fail both:
    a (2, C, 1, 1) range does not broadcast to batch 5, and 100x inputs would be clipped."""
    pytest.importorskip("onnxruntime")
    model = quantize(ReluNet()).eval()
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(6)
    batches = (torch.randn(5, 3, 8, 8), torch.randn(3, 3, 8, 8) * 100)
    for dynamo in (False, True):
        if dynamo:
            pytest.importorskip("onnxscript")
        data = gm.export_onnx(model, x, dynamo=dynamo)
        ops = _op_types(data)
        assert {"ReduceMin", "ReduceMax", "Round", "Clip"} <= ops and "QuantizeLinear" not in ops
        assert not any("_check_onnx_readiness" in q.__dict__ for q in model.modules())  # export mode undone
        for batch in batches:
            expected = model(batch).detach()
            torch.testing.assert_close(_onnxruntime_run(data, batch), expected, rtol=0,
                                       atol=1e-5 * float(expected.abs().max()))


def test_onnx_export_of_resnet20_at_another_batch_size():
    """resnet20, paper placement, W4A4, exported at batch 2, run at batch 5 and at 100x scale.
    onnxruntime's float conv differs from PyTorch's by ~1e-6; at 4 bits such a difference flips
    a rounding at a .5 boundary now and then, and 20 layers amplify the flips: measured max
    |onnx - torch| = 1.1% of the largest logit at batch 5, 3e-7 of it at 100x (torch 2.14.1,
    onnxruntime 1.32). Bound: 3% and the same argmax."""
    pytest.importorskip("onnxruntime")
    model = quantize(resnet20(), "paper", CIFAR_X).eval()
    data = gm.export_onnx(model, CIFAR_X)
    torch.manual_seed(6)
    for x in (torch.randn(5, 3, 32, 32), torch.randn(3, 3, 32, 32) * 100):
        expected = model(x).detach()
        got = _onnxruntime_run(data, x)
        assert got.shape == expected.shape
        assert float((got - expected).abs().max()) < 0.03 * float(expected.abs().max())
        assert torch.equal(got.argmax(1), expected.argmax(1))


def test_plain_torchscript_export_hits_modelopts_amax_check():
    """Why export_onnx switches modelopt's readiness check off for GranQ quantizers."""
    model = quantize(ReluNet()).eval()
    with pytest.raises(AssertionError, match="has not been calibrated"):
        torch.onnx.export(model, (torch.randn(2, 3, 8, 8),), io.BytesIO(), dynamo=False)


# ----------------------------------------------------------------------------- the student
def test_prepare_student_on_resnet20():
    teacher = resnet20().eval()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    scheme = GranQScheme.from_kwargs(4, 4, act_placement="paper", fused="eager")
    student = gm.prepare_student(teacher, scheme, CIFAR_X)
    assert len(enabled(student, "input")) == 21 and len(enabled(student, "weight")) == 22
    assert not student.training and all(p.requires_grad for p in student.parameters())
    assert not any(gm.is_granq_quantizer(m) for m in teacher.modules())  # the teacher is untouched
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())
    x = torch.randn(2, 3, 32, 32)
    quantizers = [m for m in student.modules() if gm.is_granq_quantizer(m) and m.is_enabled]
    with torch.no_grad():
        quantized, expected = student(x), teacher(x)
        for quantizer in quantizers:
            quantizer.disable()
        plain = student(x)
        for quantizer in quantizers:
            quantizer.enable()
    torch.testing.assert_close(plain, expected, rtol=1e-5, atol=1e-5)
    assert float((quantized - expected).abs().max()) > 1e-3
    running = {k: v.clone() for k, v in student.state_dict().items() if "running_" in k}
    student.train()  # BN stays frozen even in train mode
    student(x * 3 + 1).sum().backward()
    assert len(running) == 2 * 21
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in running.items())
    assert student.features.init_block.bn.weight.grad is not None
    with pytest.raises(TypeError, match="GranQScheme"):
        gm.prepare_student(teacher, {"act_bits": 4}, CIFAR_X)
