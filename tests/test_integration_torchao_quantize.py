"""granq_ao.integrations.torchao through ``quantize_``: prepare (conv, transposed conv, linear),
train, convert to reference modules or plain layers, export and load in a fresh process."""
from __future__ import annotations

import copy
import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")

from torchao.quantization import quantize_  # noqa: E402

from granq_ao import functional as F  # noqa: E402
from granq_ao.config import GranQConfig, GranQScheme  # noqa: E402
from granq_ao.functional import NonFiniteInputError  # noqa: E402
from granq_ao.integrations.torchao import (GranQQAT, GranQQATConfig, GranQQATConvTranspose1d,  # noqa: E402
                                           GranQQATConvTranspose2d, GranQReference, GranQReferenceConv2d,
                                           GranQReferenceConvTranspose2d, GranQReferenceLinear, is_conv_or_linear)
from granq_ao.integrations.torchao.layer_forward import (conv_to_transposed_layout,  # noqa: E402
                                                         transposed_to_conv_layout)

ROOT = pathlib.Path(__file__).resolve().parents[1]
GRANQ_OPS = ("granq_ao.choose_qparams_dynamic.default", "granq_ao.quantize.default", "granq_ao.dequantize.default")


def scheme(**options) -> GranQScheme:
    options.setdefault("fused", "eager")
    return GranQScheme.from_kwargs(**options)


def prepare(model: nn.Module, options: GranQScheme) -> nn.Module:
    quantize_(model, GranQQATConfig(options), filter_fn=is_conv_or_linear)
    return model


def convert(model: nn.Module, target: str = "reference") -> nn.Module:
    quantize_(model, GranQQATConfig(step="convert", target=target), filter_fn=is_conv_or_linear)
    return model


def per_output_channel_reference(weight: torch.Tensor, groups: int, bits: int) -> torch.Tensor:
    """A transposed conv weight (in, out/groups, *k) fake-quantized with one asymmetric min/max
    range per output channel, by a loop over (group, channel) slices (independent of the layout helpers)."""
    in_per_group, out_per_group = weight.shape[0] // groups, weight.shape[1]
    levels = 2 ** bits - 1
    result = torch.empty_like(weight)
    for g in range(groups):
        for j in range(out_per_group):
            block = weight[g * in_per_group:(g + 1) * in_per_group, j]
            low, high = min(block.min().item(), 0.0), max(block.max().item(), 0.0)
            scale = torch.tensor((high - low) / levels, dtype=torch.float32)
            zero = torch.round(-torch.tensor(low, dtype=torch.float32) / scale)
            codes = torch.clamp(torch.round(block / scale + zero), 0, levels)
            result[g * in_per_group:(g + 1) * in_per_group, j] = (codes - zero) * scale
    return result


# ----------------------------------------------------------------------------- transposed conv
@pytest.mark.parametrize("groups", [1, 2])
def test_layout_helpers_round_trip_and_group_order(groups):
    weight = torch.randn(4 * groups, 3, 2, 2)  # (in, out/groups, k, k)
    conv_layout = transposed_to_conv_layout(weight, groups)
    assert conv_layout.shape == (3 * groups, 4, 2, 2)
    assert torch.equal(conv_to_transposed_layout(conv_layout, groups), weight)
    for g in range(groups):  # output channel g * 3 + j reads group g's input rows
        for j in range(3):
            assert torch.equal(conv_layout[g * 3 + j], weight[g * 4:(g + 1) * 4, j])


@pytest.mark.parametrize("groups", [1, 3])
def test_conv_transpose2d_weights_per_output_channel(groups):
    torch.manual_seed(groups)
    layer = nn.ConvTranspose2d(6, 9, 3, stride=2, padding=1, output_padding=1, groups=groups)
    options = scheme(weight_bits=3, act_bits=4)
    model = prepare(nn.Sequential(copy.deepcopy(layer)), options)
    assert isinstance(model[0], GranQQATConvTranspose2d) and isinstance(model[0], nn.ConvTranspose2d)
    x = torch.randn(2, 6, 5, 5)
    expected = nn.functional.conv_transpose2d(
        F.fake_quantize(x, options.activation), per_output_channel_reference(layer.weight, groups, 3), layer.bias,
        stride=2, padding=1, output_padding=1, groups=groups)
    assert torch.allclose(model(x), expected, atol=1e-6, rtol=0)
    assert model(x).shape == layer(x).shape
    # output_size is honoured as the host layer honours it
    assert model[0](x, output_size=[9, 9]).shape == layer(x, output_size=[9, 9]).shape


def test_conv_transpose1d_and_kernel_weights():
    torch.manual_seed(0)
    layer = nn.ConvTranspose1d(4, 6, 3, groups=2)
    options = scheme(weight_bits=3, act_bits=3, weight_granularity="kernel")
    model = prepare(nn.Sequential(copy.deepcopy(layer)), options)
    assert isinstance(model[0], GranQQATConvTranspose1d)
    x = torch.randn(3, 4, 7)
    # kernel: one range per (in, out/groups) slice of the stored weight, whatever the layout
    weight = layer.weight
    expected_weight = torch.stack([torch.stack([F.fake_quantize(weight[i, j].reshape(1, -1), 3, "tensor").reshape(-1)
                                                for j in range(weight.shape[1])]) for i in range(weight.shape[0])])
    expected = nn.functional.conv_transpose1d(F.fake_quantize(x, options.activation), expected_weight, layer.bias,
                                              groups=2)
    assert torch.allclose(model(x), expected, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- a network that torch.export cannot trace
class BranchyNet(nn.Module):
    """Encoder-decoder with a data-dependent branch (``torch.export`` refuses ``if x.mean() > 0``)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.head = nn.Linear(4, 3)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.relu(self.down(x))
        if y.mean() > 0.1:
            y = self.relu(self.mid(y)) + y
        y = self.up(y)
        return self.head(y.mean((2, 3)))


def test_untraceable_network_prepares_trains_and_converts():
    torch.manual_seed(0)
    model = prepare(BranchyNet(), scheme(weight_bits=4, act_bits=4))
    qat_modules = [name for name, module in model.named_modules() if isinstance(module, GranQQAT)]
    assert qat_modules == ["down", "mid", "up", "head"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for batch in (4, 7):
        x, target = torch.randn(batch, 3, 8, 8), torch.randint(0, 3, (batch,))
        loss = nn.functional.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert model.up.weight.grad.abs().sum() > 0 and model.down.weight.grad.abs().sum() > 0
    model.eval()
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        trained = {name: value.clone() for name, value in model.state_dict().items() if "fake_quant" not in name}
        convert(model)
        assert [type(module) for module in (model.down, model.up, model.head)] == [
            GranQReferenceConv2d, GranQReferenceConvTranspose2d, GranQReferenceLinear]
        assert torch.equal(model(x), expected)
        converted_keys = {name for name in model.state_dict() if not name.endswith("_extra_state")}
        assert converted_keys == trained.keys()  # plus each reference layer's saved settings


def test_convert_to_float_gives_plain_layers_with_trained_weights():
    torch.manual_seed(0)
    float_model = BranchyNet()
    model = prepare(copy.deepcopy(float_model), scheme())
    with torch.no_grad():
        model.mid.weight.add_(0.5)  # stands for training
    convert(model, target="float")
    assert [type(module) for module in (model.down, model.mid, model.up, model.head)] == [
        nn.Conv2d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear]
    assert not any(isinstance(module, (GranQQAT, GranQReference)) for module in model.modules())
    with torch.no_grad():
        float_model.mid.weight.add_(0.5)
        x = torch.randn(3, 3, 8, 8)
        assert torch.equal(model(x), float_model(x))


def test_disabled_fake_quant_stays_float_after_convert():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3)
    model = prepare(nn.Sequential(copy.deepcopy(layer)), scheme(weight_bits=3, act_bits=3))
    model[0].input_fake_quant.disable_fake_quant()
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    convert(model)
    assert model[0].input_config is None and model[0].weight_config.bits == 3
    assert torch.equal(model(x), expected)
    assert torch.equal(expected, nn.functional.conv2d(x, F.fake_quantize(layer.weight, 3, "channel", axis=0),
                                                      layer.bias))


@pytest.mark.numerics
def test_pytorchcv_resnet20_swap_counts_and_convert_equality():
    pytest.importorskip("pytorchcv")
    from granq_ao.zsq.teachers import get_model
    torch.manual_seed(0)
    model = get_model("resnet20_cifar10")
    n_layers = sum(type(module) in (nn.Conv2d, nn.Linear) for module in model.modules())
    prepare(model, scheme(weight_bits=3, act_bits=3))
    assert sum(isinstance(module, GranQQAT) for module in model.modules()) == n_layers == 22
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        convert(model)
        assert sum(isinstance(module, GranQReference) for module in model.modules()) == 22
        assert torch.equal(model(x), expected)


# ----------------------------------------------------------------------------- export, save, load
def test_reference_model_exports_and_loads_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(6, 4, 2, stride=2),
                          nn.Flatten(), nn.Linear(4 * 16 * 16, 5))
    convert(prepare(model, scheme(weight_bits=3, act_bits=4)).eval())
    exported = torch.export.export(model, (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert {name: targets.count(name) for name in GRANQ_OPS} == {name: 6 for name in GRANQ_OPS}  # 3 inputs + 3 weights
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(exported.module()(x), expected)
    torch.export.save(exported, tmp_path / "granq.pt2")
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    torch.save(model, tmp_path / "model.pt")
    code = ("import torch, granq_ao\n"
            f"program = torch.export.load({str(tmp_path / 'granq.pt2')!r})\n"
            f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
            f"model = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)\n"
            "with torch.no_grad():\n"
            "    assert torch.equal(program.module()(io['x']), io['expected'])\n"
            "    assert torch.equal(model(io['x']), io['expected'])\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


# ----------------------------------------------------------------------------- refusals
def test_refusals_name_the_fix():
    with pytest.raises(ValueError, match="step must be one of prepare, convert"):
        GranQQATConfig(step="train")
    with pytest.raises(ValueError, match="target must be one of reference, float"):
        GranQQATConfig(step="convert", target="int8")
    model = prepare(nn.Sequential(nn.Conv2d(3, 4, 3)), scheme())
    with pytest.raises(ValueError, match="already prepared.*step=\"convert\""):
        prepare(model, scheme())
    convert(model)
    with pytest.raises(ValueError, match="already converted.*target=\"float\""):
        prepare(model, scheme())
    x = torch.randn(2, 3, 5, 5)
    x[0, 1, 2, 2] = float("inf")
    with pytest.raises(NonFiniteInputError, match="input"):
        model(x)


def test_reference_configs_are_checked():
    with pytest.raises(TypeError, match="input_config must be a GranQConfig or None"):
        GranQReferenceConv2d.from_module(nn.Conv2d(1, 1, 1), 4, GranQConfig.for_weight(4))


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_torchvision_networks_swap_train_and_convert(arch):
    """Every conv and linear swapped (counted against the float model), a step at two batch
    sizes, and the reference form equal to the QAT model in eval."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=10)
    n_layers = sum(type(module) in (nn.Conv2d, nn.Linear) for module in model.modules())
    prepare(model, scheme(weight_bits=4, act_bits=4))
    assert sum(isinstance(module, GranQQAT) for module in model.modules()) == n_layers == \
        {"resnet18": 21, "mobilenet_v2": 53}[arch]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    for batch in (2, 5):
        loss = nn.functional.cross_entropy(model(torch.randn(batch, 3, 32, 32)), torch.randint(0, 10, (batch,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        convert(model)
        assert torch.equal(model(x), expected)


# ----------------------------------------------------------------------------- round trips between forms
def test_reference_back_to_float_then_prepare_again():
    torch.manual_seed(0)
    model = convert(prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(4, 2)), scheme()))
    assert isinstance(model[0], GranQReference)
    convert(model, target="float")
    assert [type(module) for module in model] == [nn.Conv2d, nn.ReLU, nn.Linear]
    prepare(model, scheme(act_bits=8))
    assert isinstance(model[0], GranQQAT) and model[0].input_fake_quant.config.bits == 8


def test_float_checkpoint_loads_strictly_into_prepared_and_reference_models():
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    checkpoint = copy.deepcopy(float_model.state_dict())
    torch.manual_seed(1)
    qat = prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)), scheme())
    qat.load_state_dict(checkpoint)  # strict: the fake-quants keep their own state
    assert torch.equal(qat[0].weight, float_model[0].weight) and qat[0].input_fake_quant.fake_quant_on
    reference = convert(copy.deepcopy(qat))
    reference.load_state_dict(checkpoint)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(reference(x), qat.eval()(x))


def test_reference_state_dict_from_other_settings_is_refused():
    def build(**options):
        torch.manual_seed(0)
        return convert(prepare(nn.Sequential(nn.Conv2d(3, 4, 3)), scheme(**options)))

    state = build(weight_bits=4, act_bits=4).state_dict()
    build(weight_bits=4, act_bits=4).load_state_dict(state)
    with pytest.raises(RuntimeError, match=r"saved from a 4-bit asymmetric granq .*; 4-bit .* this one is 8-bit"):
        build(weight_bits=4, act_bits=8).load_state_dict(state)


@pytest.mark.parametrize("layer, shape", [(nn.Conv2d(3, 4, 3), (3, 7, 7)), (nn.ConvTranspose2d(3, 4, 2, stride=2), (3, 5, 5)),
                                          (nn.Conv1d(3, 4, 3), (3, 9)), (nn.Linear(6, 2), (6,))])
def test_unbatched_input_is_one_sample(layer, shape):
    torch.manual_seed(0)
    model = prepare(nn.Sequential(layer), scheme())
    x = torch.randn(*shape)
    assert torch.equal(model(x), model(x.unsqueeze(0))[0])
    reference = convert(copy.deepcopy(model).eval())
    assert torch.equal(reference(x), reference(x.unsqueeze(0))[0])


def test_hook_handles_taken_before_prepare_still_remove_the_hook():
    calls = []
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    handle = model[0].register_forward_hook(lambda module, args, output: calls.append(type(module).__name__))
    prepare(model, scheme())
    model(torch.randn(2, 3, 5, 5))
    assert calls == ["GranQQATConv2d"]
    handle.remove()
    model(torch.randn(2, 3, 5, 5))
    assert calls == ["GranQQATConv2d"]


def test_subclasses_left_in_float_are_named_in_a_warning():
    from torch.nn.utils import parametrizations

    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(MyConv(3, 4, 3), parametrizations.weight_norm(nn.Conv2d(4, 4, 1)), nn.Conv2d(4, 4, 1))
    with pytest.warns(UserWarning) as caught:
        prepare(model, scheme())
    messages = " | ".join(str(warning.message) for warning in caught)
    assert "MyConv (first at '0'; a subclass of nn.Conv2d) is left in float" in messages
    assert "ParametrizedConv2d" in messages and "remove_parametrizations" in messages
    assert type(model[0]) is MyConv and isinstance(model[2], GranQQAT)
