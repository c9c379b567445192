"""Shared quantizers (issue 20, item 1): an op that torch.ao gives its input's fake-quant
(ReLU6, Hardtanh, pooling, flatten, view) re-quantizes its output with the qparams of that
input, in FX and PT2E alike, and the two toolchains train bit-identical models on conv-bn-act
nets and torchvision MobileNets (forward and gradients, training and eval form, both placements).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

import granq_ao
from granq_ao import GranQScheme
from granq_ao import functional as F
from granq_ao.integrations.torch_ao import GranQFakeQuantize, GranQSharedFakeQuantize
from granq_ao.integrations.torchao import (GranQQuantizer, export_for_qat, granq_fake_quant_calls,
                                           move_exported_model_to_eval, move_exported_model_to_train)
from granq_ao.integrations.torchao.shared import GranQPT2ESharedFakeQuantize

ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardtanh": nn.Hardtanh, "sigmoid": nn.Sigmoid,
               "hardswish": nn.Hardswish}


# ----------------------------------------------------------------------------- the semantics
def test_shared_call_reuses_the_first_calls_qparams():
    """owner(x), then the shared call on relu6(x_hat): y on x's per-(n, c) grid, not on y's own."""
    torch.manual_seed(0)
    owner = GranQFakeQuantize(bits=3)
    shared = GranQSharedFakeQuantize(owner)
    x = torch.randn(4, 6, 5, 5) * 4
    x_hat = owner(x)
    y = nn.functional.relu6(x_hat)
    scale, zero_point = F.compute_qparams(*F.reduce_min_max(x, "granq"), 3)
    expected = F.fake_quantize_with_qparams(y, scale, zero_point, 0, 7)
    assert torch.equal(shared(y), expected)
    assert not torch.equal(expected, F.fake_quantize(y, 3))  # what recomputing the ranges gave
    # max-pool / flatten of the grid values: re-quantizing on the same grid changes nothing
    pooled = nn.functional.max_pool2d(x_hat, 2)
    assert torch.equal(shared(pooled), pooled)
    assert torch.equal(shared(x_hat.flatten(1)), x_hat.flatten(1))
    # a global average pool keeps (n, c): the means are snapped onto each (n, c)'s grid
    mean = x_hat.mean((2, 3), keepdim=True)
    assert torch.equal(shared(mean), F.fake_quantize_with_qparams(mean, scale, zero_point, 0, 7))
    assert torch.equal(shared(mean.flatten(1)), shared(mean).flatten(1))


def test_shared_call_gradient_is_straight_through_and_follows_enable_flags():
    owner = GranQFakeQuantize(bits=3)
    shared = GranQSharedFakeQuantize(owner)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = nn.functional.hardtanh(owner(x))
    grad = torch.randn_like(y)
    shared(y).backward(grad)
    assert torch.equal(x.grad, grad * ((owner(x) > -1) & (owner(x) < 1)))
    owner.disable_fake_quant()  # a disabled owner computes no qparams: its shared calls pass through
    y = nn.functional.hardtanh(owner(x))
    assert torch.equal(shared(y), y)


def conv_bn_pool_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(), nn.MaxPool2d(2),
                         nn.AdaptiveAvgPool2d(2), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.Hardtanh()).eval()


def test_fx_prepare_makes_later_calls_shared_and_state_dict_keys_unchanged():
    x = torch.randn(4, 3, 8, 8)
    mapping = granq_ao.get_granq_qat_qconfig_mapping(weight_bits=4, act_bits=4)
    ours = granq_ao.prepare_qat_fx(conv_bn_pool_net().train(), mapping, (x,))
    torchs = torch.ao.quantization.quantize_fx.prepare_qat_fx(conv_bn_pool_net().train(), mapping, (x,))
    shared = [m for m in granq_ao.integrations.torch_ao.activation_fake_quant_calls(ours)
              if isinstance(m, GranQSharedFakeQuantize)]
    assert len(shared) == 4  # relu6, maxpool, adaptive pool (one instance), hardtanh
    assert granq_ao.count_activation_fake_quant_calls(ours) == granq_ao.count_activation_fake_quant_calls(torchs) == 7
    # the same state_dict entries as torch's prepare: a checkpoint of either loads into the other
    assert ours.state_dict().keys() == torchs.state_dict().keys()
    torchs(x)
    ours.load_state_dict(torchs.state_dict())


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_fx_convert_equals_qat_eval_with_shared_calls(mode, tmp_path):
    x = torch.randn(4, 3, 8, 8)
    qat = granq_ao.prepare_qat_fx(conv_bn_pool_net().train(),
                                  granq_ao.get_granq_qat_qconfig_mapping(weight_bits=4, act_bits=4), (x,))
    for _ in range(3):
        qat(torch.randn(4, 3, 8, 8))
    qat.eval()
    converted = granq_ao.convert_to_reference_fx(qat, mode=mode)
    with torch.no_grad():
        if mode == "dynamic":
            assert torch.equal(converted(x), qat(x))
            ops = [n.target for n in converted.graph.nodes if n.op == "call_function"]
            assert ops.count(torch.ops.granq_ao.fake_quantize_shared.default) == 4
            torch.save(converted, tmp_path / "ref.pt")
            assert torch.equal(torch.load(tmp_path / "ref.pt", weights_only=False)(x), qat(x))
        else:  # torch's static converter: a shared call keeps its quantize point (observer's qparams)
            targets = [n.target for n in converted.graph.nodes if n.op == "call_function"]
            assert targets.count(torch.quantize_per_channel) + targets.count(torch.quantize_per_tensor) == 7


# ----------------------------------------------------------------------------- FX == PT2E
def prepare_both(model, x, placement):
    scheme = GranQScheme.from_kwargs(4, 4, act_placement=placement)
    fx = granq_ao.prepare_qat_fx(copy.deepcopy(model).train(), granq_ao.get_granq_qat_qconfig_mapping(scheme), (x,))
    pt2e = prepare_qat_pt2e(export_for_qat(copy.deepcopy(model), (x,)), GranQQuantizer(scheme))
    return fx, pt2e


def assert_bit_equal(fx, pt2e, x):
    """Training form then eval form: outputs, input gradients and every parameter gradient equal.
    Parameters are matched by gradient (the two graphs name them differently)."""
    for form in ("train", "eval"):
        if form == "train":
            fx.train()
            move_exported_model_to_train(pt2e)
        else:
            fx.eval()
            move_exported_model_to_eval(pt2e)
        results = []
        for model in (fx, pt2e):
            torch.manual_seed(1)  # dropout draws the same masks
            xi = x.clone().requires_grad_(True)
            y = model(xi)
            y.square().sum().backward()
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            model.zero_grad()
            results.append((y.detach(), xi.grad, grads))
        (y_fx, gx_fx, g_fx), (y_pt, gx_pt, g_pt) = results
        assert torch.equal(y_fx, y_pt), (form, (y_fx - y_pt).abs().max())
        assert torch.equal(gx_fx, gx_pt), form
        assert len(g_fx) == len(g_pt), form
        for grad in g_fx:
            assert any(other.shape == grad.shape and torch.equal(other, grad) for other in g_pt), form


@pytest.mark.parametrize("placement", ["all", "paper"])
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_conv_bn_act_fx_equals_pt2e(act, placement):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), ACTIVATIONS[act]()).eval()
    x = torch.randn(4, 3, 8, 8) * 2
    fx, pt2e = prepare_both(model, x, placement)
    calls = granq_ao.count_activation_fake_quant_calls(fx)
    assert calls == len(granq_fake_quant_calls(pt2e)["activation"])
    expected = {"all": {"relu": 2, "relu6": 3, "hardtanh": 3, "sigmoid": 2, "hardswish": 3},
                "paper": {"relu": 1, "relu6": 1, "hardtanh": 0, "sigmoid": 0, "hardswish": 0}}[placement][act]
    assert calls == expected
    assert_bit_equal(fx, pt2e, x)


# FX / PT2E activation fake-quant calls (GranQ ones; the fixed 8-bit ones after hardsigmoid apart)
MOBILENET_CALLS = {("mobilenet_v2", "all"): 102, ("mobilenet_v2", "paper"): 35,
                   ("mobilenet_v3_small", "all"): 101, ("mobilenet_v3_small", "paper"): 14}


@pytest.mark.parametrize("placement", ["all", "paper"])
@pytest.mark.parametrize("arch", ["mobilenet_v2", "mobilenet_v3_small"])
def test_torchvision_mobilenets_fx_equals_pt2e(arch, placement):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    fx, pt2e = prepare_both(model, x, placement)
    calls = granq_ao.count_activation_fake_quant_calls(fx)
    assert calls == len(granq_fake_quant_calls(pt2e)["activation"]) == MOBILENET_CALLS[arch, placement]
    assert_bit_equal(fx, pt2e, x)


def test_pt2e_convert_equals_qat_eval_with_shared_calls():
    x = torch.randn(4, 3, 8, 8)
    prepared = prepare_qat_pt2e(export_for_qat(conv_bn_pool_net(), (x,)), GranQQuantizer(weight_bits=4, act_bits=4))
    shared = [m for m in prepared.modules() if isinstance(m, GranQPT2ESharedFakeQuantize)]
    assert len(shared) == 4 and all(m.owner is not None for m in shared)
    move_exported_model_to_eval(prepared)
    with torch.no_grad():
        expected = prepared(x)
        converted = convert_pt2e(copy.deepcopy(prepared))
        assert torch.equal(converted(x), expected)
        assert torch.equal(converted(torch.cat([x, x])), torch.cat([expected, expected]))  # any batch
    targets = [n.target for n in converted.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.granq_ao.fake_quantize_shared.default) == 4


# ----------------------------------------------------------------------------- dropout in PT2E
def test_move_exported_model_keeps_each_dropout_probability():
    """torchao's move_exported_model_to_train/eval set every dropout to p=0.5 (the cause of FX vs
    PT2E differing on mobilenet_v2 in training form); granq_ao's keep each p."""
    from torchao.quantization.pt2e import move_exported_model_to_train as torchao_to_train
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2), nn.Linear(4, 4), nn.Dropout(0.0))
    exported = export_for_qat(model, (torch.randn(2, 4),))

    def probabilities(graph_module):
        return [n.args[1:] for n in graph_module.graph.nodes if n.target == torch.ops.aten.dropout.default]

    upstream = torchao_to_train(copy.deepcopy(exported))
    assert probabilities(upstream) == [(0.5, True), (0.5, True)]  # the upstream behaviour this works around
    move_exported_model_to_eval(exported)
    assert probabilities(exported) == [(0.2, False), (0.0, False)]
    move_exported_model_to_train(exported)
    assert probabilities(exported) == [(0.2, True), (0.0, True)]
