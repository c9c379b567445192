"""granq_ao.integrations.torchao: PT2E quantizer (prepare_qat_pt2e / convert_pt2e), quantize_ config."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")
pytest.importorskip("pytorchcv")

from torchao.quantization import quantize_  # noqa: E402
from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train  # noqa: E402
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e  # noqa: E402

import granq_ao  # noqa: E402
from granq_ao import functional as F  # noqa: E402
from granq_ao.config import GranQConfig, GranQScheme  # noqa: E402
from granq_ao.functional import NonFiniteInputError  # noqa: E402
from granq_ao.integrations.torchao import (GranQPT2EFakeQuantize, GranQQATConfig, GranQQATConv2d,  # noqa: E402
                                           GranQQATLinear, GranQQuantizer, export_for_qat,
                                           granq_fake_quant_calls, is_conv_or_linear, prepare_student)
from granq_ao.zsq.teachers import get_model  # noqa: E402

GRANQ_OPS = ("granq_ao.choose_qparams_dynamic.default", "granq_ao.quantize.default", "granq_ao.dequantize.default")


def scheme(**options) -> GranQScheme:
    options.setdefault("fused", "eager")  # no torch.compile in the tests: same numbers
    return GranQScheme.from_kwargs(**options)


def resnet20(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return get_model("resnet20_cifar10")


class SmallNet(nn.Module):
    """conv-bn-relu, conv(bias)-bn + residual add -> relu, pool, flatten, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)) + y)
        return self.fc(torch.flatten(self.pool(y), 1))


def prepare(model, placement="paper", example_batch=2, size=32, **options):
    example = (torch.randn(example_batch, 3, size, size),)
    quantizer = GranQQuantizer(scheme(act_placement=placement, **options))
    return prepare_qat_pt2e(export_for_qat(model, example), quantizer)


def fake_quant_modules(model):
    return [m for m in model.modules() if isinstance(m, GranQPT2EFakeQuantize)]


def op_counts(model) -> dict:
    targets = [str(n.target) for n in model.graph.nodes if n.op == "call_function"]
    return {name: targets.count(name) for name in GRANQ_OPS}


@pytest.fixture(scope="module")
def prepared_resnet20():
    return {placement: prepare(resnet20(), placement) for placement in ("all", "paper")}


# ----------------------------------------------------------------------------- placement
@pytest.mark.parametrize("placement, activations", [("paper", 19), ("all", 34)])
def test_resnet20_fake_quant_counts(prepared_resnet20, placement, activations):
    prepared = prepared_resnet20[placement]
    calls = granq_fake_quant_calls(prepared)
    assert len(calls["activation"]) == activations
    assert len(calls["weight"]) == 22  # 21 convs + the classifier
    configs = {m.config for m in fake_quant_modules(prepared)}
    assert configs == {scheme(act_placement=placement).activation, scheme().weight}


def test_paper_placement_quantizes_relu_outputs_only(prepared_resnet20):
    prepared = prepared_resnet20["paper"]
    nodes = {n.name: n for n in prepared.graph.nodes}
    sources = [nodes[name].args[0].target for name in granq_fake_quant_calls(prepared)["activation"]]
    assert sources == [torch.ops.aten.relu_.default] * 19


def test_paper_placement_relu6_yes_leaky_relu_no():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            x = nn.functional.relu6(self.conv1(x))
            x = nn.functional.leaky_relu(self.conv2(x), 0.1)
            return torch.relu(self.conv3(x))

    prepared = prepare(Block(), "paper", size=4)
    nodes = {n.name: n for n in prepared.graph.nodes}
    sources = [str(nodes[name].args[0].target) for name in granq_fake_quant_calls(prepared)["activation"]]
    assert sources == ["aten.relu6.default", "aten.relu.default"]  # leaky_relu (signed) skipped


def test_all_placement_quantizes_each_value_once(prepared_resnet20):
    prepared = prepared_resnet20["all"]
    modules = dict(prepared.named_modules(remove_duplicate=False))
    for node in prepared.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], GranQPT2EFakeQuantize):
            source = node.args[0]
            assert not (source.op == "call_module" and isinstance(modules[source.target], GranQPT2EFakeQuantize))
    # the image is quantized (input of the first conv), the logits too (output of the classifier)
    first = next(n for n in prepared.graph.nodes if n.op == "placeholder")
    assert any(user.op == "call_module" for user in first.users)
    output = next(n for n in prepared.graph.nodes if n.op == "output")
    assert output.args[0][0].op == "call_module"
    # the pool's output reuses its input's qparams (as torch.ao shares observers; tests/test_shared_quantizers.py)
    pool = next(n for n in prepared.graph.nodes if n.target == torch.ops.aten.avg_pool2d.default)
    (pool_user,) = pool.users
    assert modules[pool_user.target].owner is modules[pool.args[0].target]


# ----------------------------------------------------------------------------- training, batch sizes
def test_dynamic_batch_training_steps():
    torch.manual_seed(0)
    prepared = prepare(SmallNet(), "all", example_batch=4, size=16)
    move_exported_model_to_train(prepared)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.05)
    x, target = torch.randn(7, 3, 16, 16), torch.randint(0, 5, (7,))
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(prepared(x), target)
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    assert losses[-1] < losses[0]
    assert prepared.conv1.weight.grad.abs().sum() > 0  # STE: gradients reach the conv weights
    move_exported_model_to_eval(prepared)
    assert prepared(torch.randn(3, 3, 16, 16)).shape == (3, 5)


def test_export_needs_a_batch_of_two():
    with pytest.raises(ValueError, match="at least 2"):
        export_for_qat(SmallNet(), (torch.randn(1, 3, 8, 8),))


# ----------------------------------------------------------------------------- FX vs PT2E
@pytest.mark.numerics
@pytest.mark.parametrize("placement", ["paper", "all"])
def test_matches_torch_ao_fx_bit_for_bit(prepared_resnet20, placement):
    """Same float model (resnet20(seed=0)), same options, same input: the torch.ao FX QAT model
    and the PT2E one give identical outputs in training and eval form (both fold conv-bn as
    torch.ao's ConvBn2d: w * gamma / sqrt(var + eps) fake-quantized, conv output divided back)."""
    x = torch.randn(3, 3, 32, 32)
    fx = granq_ao.prepare_qat_fx(resnet20().train(), granq_ao.get_granq_qat_qconfig_mapping(
        scheme(act_placement=placement)), (x[:2],))
    assert granq_ao.count_activation_fake_quant_calls(fx) == {"paper": 19, "all": 34}[placement]
    pt2e = copy.deepcopy(prepared_resnet20[placement])
    move_exported_model_to_train(pt2e)
    with torch.no_grad():
        assert torch.equal(fx(x), pt2e(x))  # training form: batch statistics
        fx.eval()
        move_exported_model_to_eval(pt2e)
        assert torch.equal(fx(x), pt2e(x))  # eval form: running statistics


@pytest.mark.parametrize("options", [
    dict(symmetric_acts=True, symmetric_weights=True),
    dict(act_granularity="channel", weight_granularity="kernel"),
    dict(act_granularity="tensor", weight_granularity="tensor"),
    dict(act_granularity="granq_iterative", act_placement="paper"),
], ids=["symmetric", "channel-kernel", "tensor", "iterative-paper"])
def test_matches_torch_ao_fx_for_other_options(options):
    """Other granularities and grids, on a net with a conv bias, a residual add and a pool whose
    output FX quantizes with its input's fake-quant (not a no-op on symmetric or channel grids)."""
    torch.manual_seed(0)
    model, x = SmallNet(), torch.randn(5, 3, 16, 16)
    options = scheme(weight_bits=3, act_bits=5, **options)
    fx = granq_ao.prepare_qat_fx(copy.deepcopy(model).train(), granq_ao.get_granq_qat_qconfig_mapping(options),
                                 (x[:2],))
    pt2e = prepare_qat_pt2e(export_for_qat(copy.deepcopy(model), (x[:2],)), GranQQuantizer(options))
    assert granq_ao.count_activation_fake_quant_calls(fx) == len(granq_fake_quant_calls(pt2e)["activation"])
    with torch.no_grad():
        assert torch.equal(fx(x), pt2e(x))
        fx.eval()
        move_exported_model_to_eval(pt2e)
        assert torch.equal(fx(x), pt2e(x))


# ----------------------------------------------------------------------------- conversion
@pytest.fixture(scope="module")
def converted():
    """A SmallNet trained 3 steps, in eval form, and its convert_pt2e (torchao's convert takes
    ~15-30 s on a 2-core CPU whatever the model: it builds its conv-bn patterns; done once here)."""
    torch.manual_seed(0)
    prepared = prepare(SmallNet(), "all", example_batch=4, size=16)
    move_exported_model_to_train(prepared)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.05)
    for _ in range(3):
        loss = prepared(torch.randn(6, 3, 16, 16)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    move_exported_model_to_eval(prepared)
    return prepared, convert_pt2e(copy.deepcopy(prepared))


def test_convert_equals_qat_eval(converted):
    prepared, model = converted
    calls = granq_fake_quant_calls(prepared)
    n_calls = len(calls["activation"]) + len(calls["weight"])
    assert n_calls == 10
    # the pool's output (a shared call: its input's qparams) becomes one fake_quantize_shared op
    shared = sum(1 for n in model.graph.nodes if n.target == torch.ops.granq_ao.fake_quantize_shared.default)
    assert shared == 2  # the adaptive avg-pool output and the flatten after it
    assert op_counts(model) == {name: n_calls - shared for name in GRANQ_OPS}
    assert not fake_quant_modules(model)
    with torch.no_grad():
        for batch in (3, 9):
            x = torch.randn(batch, 3, 16, 16)
            assert torch.equal(model(x), prepared(x))


def test_converted_model_refuses_nan(converted):
    x = torch.randn(2, 3, 16, 16)
    x[1, 0, 3, 3] = float("nan")
    with pytest.raises(NonFiniteInputError):
        converted[1](x)


def test_converted_reexports_and_loads_in_a_fresh_process(converted, tmp_path):
    _, model = converted
    exported = torch.export.export(model, (torch.randn(2, 3, 16, 16),),
                                   dynamic_shapes=({0: torch.export.Dim.AUTO},))
    assert op_counts(exported.module()) == op_counts(model)
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(exported.module()(x), expected)
    torch.export.save(exported, tmp_path / "granq.pt2")
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    code = ("import torch, granq_ao\n"
            f"program = torch.export.load({str(tmp_path / 'granq.pt2')!r})\n"
            f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
            "with torch.no_grad():\n"
            "    assert torch.equal(program.module()(io['x']), io['expected'])\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


# ----------------------------------------------------------------------------- bad input
def test_nan_input_names_the_fake_quant():
    prepared = prepare(SmallNet(), "all", size=8)
    x = torch.randn(2, 3, 8, 8)
    x[0, 1, 2, 2] = float("inf")
    with pytest.raises(NonFiniteInputError, match=r"GranQPT2EFakeQuantize 'activation_post_process_\d+'"):
        prepared(x)


def test_bad_options_fail_at_construction():
    with pytest.raises(ValueError, match="weight_bits"):
        GranQQuantizer(weight_bits=9)
    with pytest.raises(ValueError, match="act_bits"):
        GranQQuantizer(act_bits=1)
    with pytest.raises(ValueError, match="act_placement"):
        GranQQuantizer(act_placement="everywhere")
    with pytest.raises(ValueError, match="both a GranQScheme and the keyword option\\(s\\) act_bits:"):
        GranQQuantizer(GranQScheme(), act_bits=3)
    assert GranQQuantizer(weight_bits=3, act_bits=3, act_placement="paper").scheme == GranQScheme.from_kwargs(
        3, 3, act_placement="paper")  # keywords alone still build the scheme
    with pytest.raises(TypeError, match="GranQConfig"):
        GranQPT2EFakeQuantize()
    with pytest.raises(ValueError, match="grid"):
        GranQPT2EFakeQuantize(config=GranQConfig(bits=4), quant_min=0, quant_max=255)


def test_validate_refuses_rank_one_activations():
    class Vector(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x)

    exported = export_for_qat(Vector(), (torch.randn(4),), dynamic_batch=False)
    with pytest.raises(ValueError, match="rank >= 2"):
        prepare_qat_pt2e(exported, GranQQuantizer(scheme()))


# ----------------------------------------------------------------------------- quantize_
def test_quantize_config_layer_equals_reference():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    options = scheme(weight_bits=3, act_bits=4)
    model = nn.Sequential(copy.deepcopy(conv))
    quantize_(model, GranQQATConfig(options), filter_fn=is_conv_or_linear)
    assert isinstance(model[0], GranQQATConv2d) and model[0].weight is not conv.weight
    x = torch.randn(5, 4, 9, 9)
    expected = nn.functional.conv2d(F.fake_quantize(x, options.activation), F.fake_quantize(conv.weight,
                                    options.weight), conv.bias, stride=2, padding=1)
    assert torch.equal(model(x), expected)
    assert set(model.state_dict()) >= {"0.weight", "0.bias"}


def test_quantize_config_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    quantize_(model, GranQQATConfig(scheme()), filter_fn=is_conv_or_linear)
    assert isinstance(model[0], GranQQATConv2d) and isinstance(model[3], GranQQATLinear)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, target = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    losses = []
    for _ in range(8):
        loss = nn.functional.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    assert losses[-1] < losses[0]
    assert model[0].weight.grad.abs().sum() > 0


def test_quantize_config_refusals():
    with pytest.raises(ValueError, match="GranQQuantizer"):
        GranQQATConfig(scheme(act_placement="paper"))
    with pytest.raises(TypeError, match="GranQScheme"):
        GranQQATConfig(GranQConfig())
    with pytest.raises(TypeError, match="filter_fn=is_conv_or_linear"):
        quantize_(nn.Sequential(nn.ReLU()), GranQQATConfig(), filter_fn=lambda module, fqn: isinstance(module, nn.ReLU))


# ----------------------------------------------------------------------------- zero-shot student
def test_prepare_student_resnet20_freezes_bn_statistics():
    student = prepare_student(resnet20(), scheme(act_placement="paper"), (torch.randn(2, 3, 32, 32),))
    calls = granq_fake_quant_calls(student)
    assert (len(calls["activation"]), len(calls["weight"])) == (19, 22)
    bn = student.features.init_block.bn
    running_mean = bn.running_mean.clone()
    loss = student(torch.randn(3, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    assert torch.equal(bn.running_mean, running_mean)  # frozen: running statistics not updated
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0  # affine parameters train
    move_exported_model_to_train(student)  # freeze_bn=False gives this form: statistics update
    student(torch.randn(3, 3, 32, 32))
    assert not torch.equal(bn.running_mean, running_mean)


def test_missing_torchao_names_the_extra(monkeypatch):
    saved = {name: module for name, module in sys.modules.items()
             if name == "torchao" or name.startswith(("torchao.", "granq_ao.integrations.torchao"))}
    try:
        for name in saved:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError
        with pytest.raises(ImportError, match=r'pip install -e "\.\[torchao\]"'):
            __import__("granq_ao.integrations.torchao")
    finally:
        sys.modules.update(saved)


# ----------------------------------------------------------------------------- torchvision networks
@pytest.mark.parametrize("arch, relu_outputs", [("resnet18", 17), ("mobilenet_v2", 35)])
def test_torchvision_networks_match_fx_train_and_convert(arch, relu_outputs):
    """torchvision resnet18 (ReLU) and mobilenet_v2 (ReLU6, residual adds without ReLU), paper
    placement: PT2E puts its fake-quants where the FX path does (one per ReLU/ReLU6 output),
    computes the FX QAT model's outputs, trains at two batch sizes (dynamic batch) and converts
    to a graph equal to the QAT model in eval."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    fx = granq_ao.prepare_qat_fx(copy.deepcopy(model).train(), granq_ao.get_granq_qat_qconfig_mapping(
        scheme(act_placement="paper")), (x,))
    pt2e = prepare(copy.deepcopy(model), "paper")
    assert granq_ao.count_activation_fake_quant_calls(fx) == relu_outputs
    assert len(granq_fake_quant_calls(pt2e)["activation"]) == relu_outputs
    move_exported_model_to_eval(pt2e)
    with torch.no_grad():
        assert torch.equal(pt2e(x), fx.eval()(x))
    move_exported_model_to_train(pt2e)
    optimizer = torch.optim.SGD(pt2e.parameters(), lr=1e-3)
    for batch in (2, 5):
        loss = nn.functional.cross_entropy(pt2e(torch.randn(batch, 3, 32, 32)), torch.randint(0, 10, (batch,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    move_exported_model_to_eval(pt2e)
    with torch.no_grad():
        expected = pt2e(x)
        converted = convert_pt2e(pt2e)
        assert torch.equal(converted(x), expected)
