"""BatchNorm weights of exactly 0 (zero-initialised last BNs, pruned channels): preparing (FX, eager,
PT2E) gives finite outputs, the zero-gamma channel gives beta, the others torch.ao's numbers."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.ao.nn.intrinsic.qat.modules.conv_fused import _ConvBnNd

import granq_ao
from granq_ao.config import GranQScheme
from granq_ao.integrations.torch_ao import route_zero_gamma_batchnorm
from granq_ao.integrations.torch_ao.zero_gamma import is_routed, zero_gamma_safe_forward

SCHEME = GranQScheme.from_kwargs(4, 4, fused="eager")


@pytest.fixture(autouse=True)
def _eager_math(monkeypatch):
    monkeypatch.setenv("GRANQ_FUSED", "eager")


def zero_init_resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, zero_init_residual=True, num_classes=10)


def pruned_net():
    """conv-bn-relu twice, BN channel 2 of the first pruned (gamma = 0), running stats set."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4))
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1, 1)
        model[1].weight[2] = 0.0
        model[1].bias[2] = 0.5  # a positive beta: the ReLU passes it (and its gradient)
    return model


def fx(model, example=(torch.randn(2, 3, 32, 32),), mapping=None):
    mapping = mapping or granq_ao.get_granq_qat_qconfig_mapping(SCHEME)
    return granq_ao.prepare_qat_fx(copy.deepcopy(model).train(), mapping, example)


def test_torch_ao_conv_bn_qat_divides_by_zero_gamma():
    """The cause, as torch.ao computes it (what the routing avoids)."""
    prepared = fx(pruned_net(), (torch.randn(2, 3, 8, 8),))
    module = next(m for m in prepared.modules() if isinstance(m, _ConvBnNd) and is_routed(m))
    with torch.no_grad():
        out = type(module)._forward_approximate(module, torch.randn(2, 3, 8, 8))
    assert torch.isnan(out[:, 2]).all() and torch.isfinite(out[:, [0, 1, 3, 4, 5]]).all()


def test_fx_zero_init_resnet18_is_finite_in_train_and_eval():
    prepared = fx(zero_init_resnet18())
    routed = [name for name, module in prepared.named_modules() if is_routed(module)]
    assert len(routed) == 8  # the bn2 of each of the 8 basic blocks
    x = torch.randn(4, 3, 32, 32)
    assert torch.isfinite(prepared(x)).all()
    prepared.eval()
    with torch.no_grad():
        assert torch.isfinite(prepared(x)).all()


def test_fx_pruned_channel_gives_beta_and_keeps_gamma_gradient():
    model = pruned_net()
    prepared = fx(model, (torch.randn(2, 3, 8, 8),)).eval()
    first = next(m for m in prepared.modules() if isinstance(m, _ConvBnNd))
    x = torch.randn(3, 3, 8, 8)
    outputs = {}
    handle = first.register_forward_hook(lambda m, args, out: outputs.update(conv_bn_relu=out))
    with torch.no_grad():
        prepared(x)
    handle.remove()
    expected = torch.relu(model[1].bias[2]).expand(3, 8, 8)
    assert torch.equal(outputs["conv_bn_relu"][:, 2], expected)
    # the zero gamma is trainable: BN's gradient (normalized conv output), not 0 or NaN
    prepared.train()
    prepared(x).square().sum().backward()
    grad = first.bn.weight.grad
    assert torch.isfinite(grad).all() and grad[2] != 0


def test_routing_is_bit_identical_where_no_gamma_is_zero():
    prepared = fx(pruned_net(), (torch.randn(2, 3, 8, 8),))
    modules = [m for m in prepared.modules() if isinstance(m, _ConvBnNd)]
    assert [is_routed(m) for m in modules] == [True, False]  # only the module with a zero gamma
    second = modules[1].eval()
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        assert torch.equal(zero_gamma_safe_forward(second, x), type(second)._forward_approximate(second, x))


def test_eager_prepare_qat_then_route():
    from torchvision.models.quantization import resnet18

    torch.manual_seed(0)
    model = resnet18(weights=None, quantize=False, num_classes=10, zero_init_residual=True).train()
    model.fuse_model(is_qat=True)
    model.qconfig = granq_ao.get_granq_qconfig(SCHEME)
    torch.ao.quantization.prepare_qat(model, inplace=True)
    x = torch.randn(2, 3, 32, 32)
    # torch.ao's forward: NaN from layer1.0's bn2; the error names the cause and the way out
    with pytest.raises(granq_ao.NonFiniteInputError, match=r"Likely cause: the BatchNorm weight of fused Conv-BN "
                                                           r"'layer1\.0\.conv2' \(8 module\(s\)\).*"
                                                           r"route_zero_gamma_batchnorm"):
        copy.deepcopy(model)(x)
    assert route_zero_gamma_batchnorm(model) == [f"layer{i}.{j}.conv2" for i in (1, 2, 3, 4) for j in (0, 1)]
    assert torch.isfinite(model(x)).all()
    model.eval()
    with torch.no_grad():
        assert torch.equal(granq_ao.convert_eager(model)(x), model(x))


def test_pt2e_refuses_bare_prepare_and_routes_in_prepare_qat():
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

    from granq_ao.integrations.torchao import GranQQuantizer, export_for_qat, prepare_qat

    teacher = zero_init_resnet18()
    example = (torch.randn(2, 3, 32, 32),)
    with pytest.raises(ValueError, match=r"BatchNorm weight 'layer1\.0\.bn2\.weight' \(and 7 more\).*divides.*"
                                         r"granq_ao\.integrations\.torchao\.prepare_qat"):
        prepare_qat_pt2e(export_for_qat(copy.deepcopy(teacher), example), GranQQuantizer(SCHEME))
    prepared = prepare_qat(export_for_qat(copy.deepcopy(teacher), example), GranQQuantizer(SCHEME))
    x = torch.randn(4, 3, 32, 32)
    reference = fx(teacher, example).eval()  # before any train-mode call updates running stats
    eval_model = move_exported_model_to_eval(copy.deepcopy(prepared))
    with torch.no_grad():
        expected = reference(x)
        out = eval_model(x)
        assert torch.equal(out, expected)  # FX and PT2E route the same way
        assert torch.equal(convert_pt2e(eval_model)(x), out)
    assert torch.isfinite(prepared(x)).all()  # train form (batch statistics)


def test_pt2e_pruned_channel():
    from torchao.quantization.pt2e import move_exported_model_to_eval

    from granq_ao.integrations.torchao import GranQQuantizer, export_for_qat, prepare_qat

    model = pruned_net()
    example = (torch.randn(2, 3, 8, 8),)
    prepared = move_exported_model_to_eval(prepare_qat(export_for_qat(copy.deepcopy(model), example),
                                                       GranQQuantizer(SCHEME)))
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(prepared(x), fx(model, example).eval()(x))


@pytest.mark.parametrize("toolchain", ["fx", "pt2e", "modelopt"])
def test_zero_shot_student_of_a_zero_init_timm_resnet(toolchain):
    timm = pytest.importorskip("timm")
    if toolchain == "modelopt":
        pytest.importorskip("modelopt")
    from granq_ao.zsq.student import build_student, student_protocol

    torch.manual_seed(0)
    teacher = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()  # zero_init_last=True
    assert sum(bool((m.weight == 0).all()) for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)) == 4
    example = (torch.randn(2, 3, 32, 32),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = build_student(toolchain, teacher, GranQScheme.from_kwargs(4, 4, act_placement="paper", fused="eager"),
                                example)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.isfinite(student(x)).all()
    student_protocol(toolchain).set_training(student, True)  # what the trainer calls (PT2E graphs refuse .train())
    assert torch.isfinite(student(x)).all()
