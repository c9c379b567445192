"""act_placement="inputs": one GranQ activation fake-quant on the input of every conv/linear, nothing
else, in every integration (FX, eager, PT2E, quantize_, modelopt, pytorch-quantization)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import granq_ao
from granq_ao.config import GranQScheme, PlacementWarning
from granq_ao.integrations.torch_ao import GranQFakeQuantize, apply_input_placement
from granq_ao.integrations.torch_ao.input_placement import is_weighted_call


@pytest.fixture(autouse=True)
def _eager_math(monkeypatch):
    monkeypatch.setenv("GRANQ_FUSED", "eager")


def scheme(placement: str) -> GranQScheme:
    return GranQScheme.from_kwargs(4, 4, act_placement=placement, fused="eager")


def resnet20():
    from pytorchcv.model_provider import get_model

    torch.manual_seed(0)
    return get_model("resnet20_cifar10", pretrained=False)


class SiLUNet(nn.Module):
    """No ReLU anywhere; the input of conv2 is read by conv2, conv3 and an add."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.conv3 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = nn.functional.silu(self.bn(self.conv1(x)))
        x = self.conv2(x) + self.conv3(x) + x
        return self.fc(x.mean((2, 3)))


EXAMPLE = (torch.randn(2, 3, 8, 8),)


def fx_prepare(model, placement, example=EXAMPLE):
    return granq_ao.prepare_qat_fx(copy.deepcopy(model).train(),
                                   granq_ao.get_granq_qat_qconfig_mapping(scheme(placement)), example)


def pt2e_prepare(model, placement, example=EXAMPLE):
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    from granq_ao.integrations.torchao import GranQQuantizer, export_for_qat

    return prepare_qat_pt2e(export_for_qat(copy.deepcopy(model), example), GranQQuantizer(scheme(placement)))


def granq_calls(model):
    modules = dict(model.named_modules(remove_duplicate=False))
    return [node for node in model.graph.nodes
            if node.op == "call_module" and isinstance(modules[str(node.target)], GranQFakeQuantize)]


def test_fx_inputs_quantize_every_conv_linear_input_and_nothing_else():
    model = fx_prepare(SiLUNet(), "inputs")
    modules = dict(model.named_modules(remove_duplicate=False))
    calls = granq_calls(model)
    # conv1 (image), the SiLU output read by conv2 and conv3 (once), the pooled features read by fc
    assert len(calls) == 3
    for node in calls:
        assert node.users and all(is_weighted_call(user, modules) and user.args[0] is node for user in node.users)
    weighted = [node for node in model.graph.nodes if is_weighted_call(node, modules)]
    assert len(weighted) == 4 and all(node.args[0] in calls for node in weighted)
    shared = next(node for node in calls if len(node.users) == 2)
    assert {str(user.target) for user in shared.users} == {"conv2", "conv3"}
    # the add reads the float SiLU output, not the quantized one
    adds = [node for node in model.graph.nodes if node.op == "call_function" and "add" in str(node.target)]
    assert adds and not any(arg in calls for node in adds for arg in node.args)
    # instances of their own (none shared between calls)
    assert len({id(modules[str(node.target)]) for node in calls}) == 3


def test_fx_inputs_on_resnet20_and_reference_convert_equal():
    model = fx_prepare(resnet20(), "inputs", (torch.randn(2, 3, 32, 32),))
    assert granq_ao.count_activation_fake_quant_calls(model) == 20  # 22 layers, 2 shortcut convs share
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    reference = granq_ao.convert_to_reference_fx(copy.deepcopy(model))
    with torch.no_grad():
        assert torch.equal(reference(x), model(x))
        model.apply(torch.ao.quantization.disable_fake_quant)
        unquantized = model(x)
    assert torch.isfinite(unquantized).all()


def test_fx_and_pt2e_inputs_bit_equal_on_resnet20():
    from torchao.quantization.pt2e import move_exported_model_to_eval

    from granq_ao.integrations.torchao import granq_fake_quant_calls

    teacher = resnet20()
    example = (torch.randn(2, 3, 32, 32),)
    fx = fx_prepare(teacher, "inputs", example).eval()
    pt2e = pt2e_prepare(teacher, "inputs", example)
    assert len(granq_fake_quant_calls(pt2e)["activation"]) == granq_ao.count_activation_fake_quant_calls(fx) == 20
    pt2e = move_exported_model_to_eval(pt2e)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fx(x), pt2e(x))


def test_pt2e_inputs_counts_and_shared_value_once():
    from granq_ao.integrations.torchao import granq_fake_quant_calls

    calls = granq_fake_quant_calls(pt2e_prepare(SiLUNet(), "inputs"))
    assert len(calls["activation"]) == 3 and len(calls["weight"]) == 4


@pytest.mark.parametrize("toolchain", ["fx", "pt2e"])
def test_paper_placement_without_relu_warns_naming_the_count(toolchain):
    prepare = fx_prepare if toolchain == "fx" else pt2e_prepare
    with pytest.warns(PlacementWarning, match=r"act_placement='paper'.*0 activation.*'inputs' would quantize the 3 "):
        prepare(SiLUNet(), "paper")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlacementWarning)
        prepare(SiLUNet(), "inputs")


def test_torch_prepare_warns_for_inputs_placement():
    from torch.ao.quantization.quantize_fx import prepare_qat_fx as torch_prepare_qat_fx

    with pytest.warns(PlacementWarning, match="apply_input_placement"):
        torch_prepare_qat_fx(SiLUNet().train(), granq_ao.get_granq_qat_qconfig_mapping(scheme("inputs")), EXAMPLE)


def test_eager_inputs_on_torchvision_quantizable_resnet18():
    from torchvision.models.quantization import resnet18

    torch.manual_seed(0)
    model = resnet18(weights=None, quantize=False, num_classes=10).train()
    model.fuse_model(is_qat=True)
    model.qconfig = granq_ao.get_granq_qconfig(GranQScheme.from_kwargs(4, 4, fused="eager"))
    torch.ao.quantization.prepare_qat(model, inplace=True)
    assert apply_input_placement(model) == 21  # every conv/linear module (eager sees no shared values)
    assert granq_ao.count_activation_fake_quant_calls(model) == 21
    seen = []
    handles = [module.register_forward_pre_hook(lambda m, args, name=name: seen.append(name))
               for name, module in model.named_modules()
               if isinstance(module, GranQFakeQuantize) and not name.endswith("weight_fake_quant")]
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
    for handle in handles:
        handle.remove()
    # each runs once, on a conv/linear input; nothing else is quantized
    assert len(seen) == 21 and all(name.endswith("activation_post_process") for name in seen)
    modules = dict(model.named_modules())
    assert all(isinstance(modules[name.rpartition(".")[0]], (nn.Conv2d, nn.Linear)) for name in seen)
    with torch.no_grad():
        assert torch.equal(granq_ao.convert_eager(model)(x), out)


def test_quantize_config_takes_inputs_and_refuses_paper():
    pytest.importorskip("torchao")
    from torchao.quantization import quantize_

    from granq_ao.integrations.torchao import GranQQAT, GranQQATConfig, is_conv_or_linear

    model = SiLUNet()
    quantize_(model, GranQQATConfig(scheme("inputs")), filter_fn=is_conv_or_linear)
    assert sum(isinstance(module, GranQQAT) for module in model.modules()) == 4
    with pytest.raises(ValueError, match="'inputs'.*not 'paper'.*GranQQuantizer"):
        GranQQATConfig(scheme("paper"))


def test_modelopt_inputs_enables_conv_linear_input_quantizers_only():
    pytest.importorskip("modelopt")
    gm = pytest.importorskip("granq_ao.integrations.modelopt")
    import modelopt.torch.quantization as mtq

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = mtq.quantize(model, gm.granq_quant_cfg(scheme("inputs")), forward_loop=None)
    enabled = [name for name, module in quantized.named_modules()
               if name.endswith("input_quantizer") and gm.is_granq_quantizer(module) and module.is_enabled]
    assert enabled == ["0.input_quantizer", "3.input_quantizer", "6.input_quantizer"]
    assert torch.isfinite(quantized(torch.randn(2, 3, 8, 8))).all()


def test_pytorch_quantization_inputs_replaces_conv_linear_quantizers_only():
    pytest.importorskip("pytorch_quantization")
    gq = pytest.importorskip("granq_ao.integrations.pytorch_quantization")
    from pytorch_quantization import nn as quant_nn

    model = nn.Sequential(quant_nn.QuantConv2d(3, 4, 3), nn.SiLU(), quant_nn.QuantAvgPool2d(2),
                          quant_nn.QuantConv2d(4, 4, 1), nn.Flatten(), quant_nn.QuantLinear(4 * 9, 2))
    replaced = gq.replace_input_quantizers(model, gq.GranQDescriptor(num_bits=4), placement="inputs",
                                           disable_others=True)
    assert replaced == ["0", "3", "5"]
    assert model[2]._input_quantizer._disabled
    with pytest.raises(ValueError, match="only_after_relu=True is the 'paper' placement"):
        gq.replace_input_quantizers(model, only_after_relu=True, placement="inputs")
    with pytest.raises(ValueError, match="placement must be one of"):
        gq.replace_input_quantizers(model, placement="outputs")


def test_placement_counts_script_row_of_docs(capsys):
    """The ResNet-20 row of docs/PLACEMENT.md, as benchmarks/placement_counts.py prints it (FX)."""
    from benchmarks import placement_counts

    placement_counts.main(["--nets", "resnet20_cifar10", "--toolchains", "fx"])
    assert "| resnet20_cifar10 | 22 | 19 | 34 | 20 |" in capsys.readouterr().out.splitlines()


def test_mobilenet_v3_small_counts_fx_and_pt2e():
    """Hard-swish and squeeze-excitation: paper finds the 14 ReLU points, inputs all 54 layers
    (docs/PLACEMENT.md)."""
    import torchvision

    from granq_ao.integrations.torchao import granq_fake_quant_calls

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(weights=None)
    example = (torch.randn(2, 3, 64, 64),)
    counts = {}
    for placement in ("paper", "inputs"):
        counts["fx", placement] = granq_ao.count_activation_fake_quant_calls(fx_prepare(model, placement, example))
        counts["pt2e", placement] = len(granq_fake_quant_calls(pt2e_prepare(model, placement, example))["activation"])
    assert counts == {("fx", "paper"): 14, ("pt2e", "paper"): 14, ("fx", "inputs"): 54, ("pt2e", "inputs"): 54}
