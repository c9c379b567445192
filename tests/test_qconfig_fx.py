"""QConfigs + prepare_qat_fx on real architectures: fake-quants really inserted (counted), forward
and backward work, placements, weight granularities, fixed-qparams ops, eval-mode dynamics.

Counts are call sites of GranQ activation fake-quants in the prepared graph (FX calls one shared
instance once per op that reuses its input's observer: maxpool, avgpool, flatten/view, ReLU6),
distinct activation instances, and weight fake-quants (one per conv/linear).
"""
import pytest
import torch
import torch.nn as nn
import torchvision
from pytorchcv.model_provider import get_model as pytorchcv_model
from torch.ao.quantization import get_default_qat_qconfig_mapping
from torch.ao.quantization.fake_quantize import FixedQParamsFakeQuantize
from torch.ao.quantization.quantize_fx import prepare_qat_fx as torch_prepare_qat_fx

import granq_ao
from granq_ao import functional as F
from granq_ao.integrations.torch_ao.fake_quantize import GranQFakeQuantize
from granq_ao.integrations.torch_ao.placement import apply_paper_placement, count_activation_fake_quant_calls


def mapping(placement="all", **kwargs):
    kwargs.setdefault("fused", False)  # eager path: no compile in these tests
    return granq_ao.get_granq_qat_qconfig_mapping(4, 4, act_placement=placement, **kwargs)


def counts(model):
    """(activation call sites, distinct activation instances, weight fake-quants)."""
    modules = dict(model.named_modules())
    weights = [m for n, m in modules.items() if n.endswith("weight_fake_quant")]
    assert all(isinstance(m, GranQFakeQuantize) for m in weights)
    activations = [m for n, m in modules.items()
                   if isinstance(m, GranQFakeQuantize) and not n.endswith("weight_fake_quant")]
    return count_activation_fake_quant_calls(model), len(activations), len(weights)


def activation_sources(model):
    """The module feeding each GranQ activation fake-quant call (None if not a module)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    sources = []
    for node in model.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(str(node.target)), GranQFakeQuantize):
            source = node.args[0]
            sources.append(modules.get(str(source.target)) if source.op == "call_module" else None)
    return sources


def forward_backward(model, x):
    out = model(x)
    out.float().square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 4]
    assert grads and all(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    return out


def resnet20(classes=10):
    torch.manual_seed(0)
    return pytorchcv_model(f"resnet20_cifar{classes}", pretrained=False)


CIFAR = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

# ResNet-20 (pytorchcv): init conv-bn-relu, 9 units (conv1-bn-relu, conv2-bn, add, relu), 1x1
# identity conv-bn in the first unit of stages 2 and 3, avgpool, view, linear.
# torch.ao placement ("all"): input 1 + init 1 + 9 x (conv1-bn-relu, conv2-bn, unit relu) 27
#   + 2 identity conv-bn + logits 1 = 32 instances; avgpool and view reuse the last relu's
#   instance: 34 call sites. The add is not observed (add -> relu is one pattern).
# Paper placement: the 19 ReLU outputs (init 1 + 9 x 2). Weights: 19 + 2 convs + 1 linear = 22.
RESNET20_ALL = (34, 32, 22)
RESNET20_PAPER = (19, 19, 22)


# ----------------------------------------------------------------------------- ResNet-20
@pytest.mark.parametrize("classes", [10, 100])
def test_resnet20_torch_prepare_all_placement(classes):
    model = torch_prepare_qat_fx(resnet20(classes).train(), mapping("all"), (CIFAR,))
    assert counts(model) == RESNET20_ALL
    assert forward_backward(model, CIFAR).shape == (2, classes)


@pytest.mark.parametrize("classes", [10, 100])
def test_resnet20_granq_prepare_paper_placement(classes):
    model = granq_ao.prepare_qat_fx(resnet20(classes).train(), mapping("paper"), (CIFAR,))
    assert counts(model) == RESNET20_PAPER
    sources = activation_sources(model)
    fed_by_relu = [s for s in sources if isinstance(s, nn.ReLU) or type(s).__name__ == "ConvBnReLU2d"]
    assert len(fed_by_relu) == len(sources) == 19
    code = model.code
    assert "final_pool(activation_post_process" in code  # pooled features not re-quantized
    assert forward_backward(model, CIFAR).shape == (2, classes)


def test_apply_paper_placement_after_torch_prepare_matches():
    model = torch_prepare_qat_fx(resnet20().train(), mapping("all"), (CIFAR,))
    assert apply_paper_placement(model) == RESNET20_ALL[0] - RESNET20_PAPER[0]
    assert counts(model) == RESNET20_PAPER
    assert len(dict(model.named_modules())) == len(dict(model.named_modules(remove_duplicate=False)))


@pytest.mark.parametrize("granularity", ["channel", "tensor", "granq_iterative"])  # granq: above
def test_every_act_granularity_trains(granularity):
    model = granq_ao.prepare_qat_fx(resnet20().train(), mapping("paper", act_granularity=granularity),
                                    (CIFAR,))
    assert counts(model) == RESNET20_PAPER
    assert {m.config.name for n, m in model.named_modules()
            if isinstance(m, GranQFakeQuantize) and not n.endswith("weight_fake_quant")} == {granularity}
    forward_backward(model, CIFAR)


def test_weight_granularities():
    """'kernel' = one range per (out, in) slice: a 1x1 conv weight has min == max in every slice
    and stays unquantized (as in the official code); 'channel' quantizes it."""
    results = {}
    for weight_granularity in ("channel", "kernel", "tensor"):
        model = granq_ao.prepare_qat_fx(resnet20().train(),
                                        mapping("paper", weight_granularity=weight_granularity), (CIFAR,))
        with torch.no_grad():
            assert torch.isfinite(model(CIFAR)).all()
        modules = dict(model.named_modules())
        one_by_one = modules["features.stage2.unit1.identity_conv.conv"]
        three_by_three = modules["features.stage2.unit1.body.conv1.conv"]
        assert one_by_one.weight.shape[2:] == (1, 1) and three_by_three.weight.shape[2:] == (3, 3)
        results[weight_granularity] = [
            (conv.weight.detach(), conv.weight_fake_quant(conv.weight.detach()))
            for conv in (one_by_one, three_by_three)
        ]
    (w1, kernel_1x1), (w3, kernel_3x3) = results["kernel"]
    assert torch.equal(kernel_1x1, w1)  # unquantized
    for o, i in ((0, 0), (5, 7), (31, 15)):  # each (out, in) slice quantized on its own range
        assert torch.equal(kernel_3x3[o, i], F.fake_quantize(w3[o, i].reshape(1, 9), 4, "granq", fused=False)
                           .reshape(3, 3))
    (_, channel_1x1), (_, channel_3x3) = results["channel"]
    assert not torch.equal(channel_1x1, w1)
    assert torch.equal(channel_3x3, F.fake_quantize(w3, 4, "channel", axis=0, fused=False))
    (_, tensor_1x1), (_, tensor_3x3) = results["tensor"]
    assert torch.equal(tensor_3x3, F.fake_quantize(w3, 4, "tensor", fused=False))
    assert torch.unique(tensor_3x3).numel() <= 16


# ----------------------------------------------------------------------------- eval: dynamic
@pytest.mark.numerics
@pytest.mark.parametrize("granularity, independent", [("granq", True), ("tensor", False)])
def test_eval_mode_quantizes_each_sample_on_its_own(granularity, independent):
    """No calibration: in eval, GranQ ranges still come from each sample, so a sample's output
    does not depend on the rest of the batch. Per-tensor ranges do."""
    model = granq_ao.prepare_qat_fx(resnet20().train(), mapping("paper", act_granularity=granularity),
                                    (CIFAR,))
    model(CIFAR)
    model.eval()
    sample = CIFAR[:1]
    other = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 4
    with torch.no_grad():
        alone = model(torch.cat([sample, sample]))[0]
        with_other = model(torch.cat([sample, other]))[0]
    if independent:
        assert torch.allclose(alone, with_other, rtol=0, atol=1e-5)
    else:
        assert (alone - with_other).abs().max() > 1e-3


# ----------------------------------------------------------------------------- ImageNet models
def _adaptive_pool(model):
    # pytorchcv ImageNet models end in AvgPool2d(7) (224 input only); adaptive pooling lets a small
    # input through without changing anything a fake-quant sees.
    model.features.final_pool = nn.AdaptiveAvgPool2d(1)
    return model


# (builder, input size, all-placement counts, paper counts). Derivations:
# ResNet-18 (torchvision and pytorchcv): input + stem conv-bn-relu + 8 blocks x 3 (conv1-bn-relu,
#   conv2-bn, add-relu) + 3 downsample conv-bn + fc = 30 instances; maxpool, avgpool, flatten
#   reuse one: 33 calls. Paper: 1 + 8 x 2 = 17 ReLU calls. Weights: 20 convs + fc.
# ResNet-50: input + stem + 16 x 4 (conv1-relu, conv2-relu, conv3-bn, add-relu) + 4 downsample +
#   fc = 71 instances, 74 calls. Paper: 1 + 16 x 3 = 49. Weights: 53 convs + fc.
# MobileNetV2: ReLU6 reuses its conv-bn's instance (a call per ReLU6), so the paper placement keeps
#   exactly the ReLU6 outputs. torchvision: input + 52 conv-bn + 10 adds + dropout + fc = 65
#   instances; 35 ReLU6 + avgpool + flatten calls on top: 102. pytorchcv: input + 54 convs (the
#   classifier is a 1x1 conv) + 10 adds = 65; 36 ReLU6 + pool + view: 103.
IMAGENET_MODELS = {
    "tv_resnet18": (lambda: torchvision.models.resnet18(weights=None), 32, (33, 30, 21), (17, 17, 21)),
    "tv_resnet50": (lambda: torchvision.models.resnet50(weights=None), 64, (74, 71, 54), (49, 49, 54)),
    "tv_mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(weights=None), 32, (102, 65, 53),
                        (35, 35, 53)),
    "cv_resnet18": (lambda: _adaptive_pool(pytorchcv_model("resnet18", pretrained=False)), 32,
                    (33, 30, 21), (17, 17, 21)),
    "cv_mobilenetv2_w1": (lambda: _adaptive_pool(pytorchcv_model("mobilenetv2_w1", pretrained=False)),
                          32, (103, 65, 54), (36, 36, 54)),
}


@pytest.mark.parametrize("name", list(IMAGENET_MODELS))
def test_imagenet_models_prepare_count_and_train(name):
    build, size, all_counts, paper_counts = IMAGENET_MODELS[name]
    torch.manual_seed(0)
    float_model = build().train()
    relu_modules = sum(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in float_model.modules())
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    model = torch_prepare_qat_fx(float_model, mapping("all"), (x,))
    assert counts(model) == all_counts
    apply_paper_placement(model)
    assert counts(model) == paper_counts
    sources = activation_sources(model)
    if "mobilenet" in name:
        assert all(isinstance(s, nn.ReLU6) for s in sources)
        assert len(sources) == relu_modules  # every ReLU6 module is called once
    else:
        assert all(isinstance(s, nn.ReLU) or type(s).__name__ == "ConvBnReLU2d" for s in sources)
    assert forward_backward(model, x).shape == (2, 1000)


# ----------------------------------------------------------------------------- qconfig mapping
class WithFixedQParamsOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.sigmoid = nn.Sigmoid()
        self.tanh = nn.Tanh()

    def forward(self, x):
        y = self.conv(x)
        return self.sigmoid(y) + self.tanh(y)


def test_mapping_keeps_torch_fixed_qparams_qconfigs():
    granq_mapping = mapping("all")
    torch_mapping = get_default_qat_qconfig_mapping("x86")
    for op in (nn.Sigmoid, torch.sigmoid, nn.Tanh, torch.tanh, nn.Softmax, nn.Hardsigmoid):
        # QConfigs compare by identity of their partials; their reprs show class and arguments
        assert repr(granq_mapping.object_type_qconfigs[op]) == repr(torch_mapping.object_type_qconfigs[op])
        assert "FixedQParamsFakeQuantize" in repr(granq_mapping.object_type_qconfigs[op].activation)
    assert isinstance(granq_mapping.global_qconfig.activation(), GranQFakeQuantize)
    model = torch_prepare_qat_fx(WithFixedQParamsOps().train(), granq_mapping, (torch.randn(2, 3, 6, 6),))
    modules = dict(model.named_modules(remove_duplicate=False))
    after = {}
    for node in model.graph.nodes:
        if node.op == "call_module" and node.args and hasattr(node.args[0], "target"):
            source = modules.get(str(node.args[0].target))
            if isinstance(source, (nn.Sigmoid, nn.Tanh)):
                after[type(source).__name__] = type(modules[str(node.target)])
    assert after == {"Sigmoid": FixedQParamsFakeQuantize, "Tanh": FixedQParamsFakeQuantize}
    assert counts(model)[2] == 1
    assert any(isinstance(m, GranQFakeQuantize) for n, m in model.named_modules()
               if not n.endswith("weight_fake_quant"))
    model(torch.randn(2, 3, 6, 6)).sum().backward()


@pytest.mark.parametrize("kwargs", [dict(weight_bits=9), dict(act_bits=1), dict(weight_bits=0),
                                    dict(act_bits=3.5), dict(act_bits=True)])
def test_bad_bits_rejected_at_qconfig_construction(kwargs):
    with pytest.raises(ValueError, match="bits"):
        granq_ao.get_granq_qconfig(**kwargs)
    with pytest.raises(ValueError, match="bits"):
        granq_ao.get_granq_qat_qconfig_mapping(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(act_granularity="per_token"), "act_granularity"),
    (dict(weight_granularity="granq"), "weight_granularity"),
    (dict(act_placement="everywhere"), "act_placement"),
])
def test_bad_names_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        granq_ao.get_granq_qat_qconfig_mapping(**kwargs)


def test_scheme_with_conflicting_keywords_is_refused():
    """A GranQScheme holds every option: a keyword given too would be silently ignored, so it is a
    ValueError naming the keywords (as torchao's QATConfig does). Non-scheme options still combine."""
    scheme = granq_ao.GranQScheme.from_kwargs(3, 3)
    for build in (granq_ao.get_granq_qconfig, granq_ao.get_granq_qat_qconfig_mapping):
        with pytest.raises(ValueError, match=r"keyword option\(s\) act_bits, fused: "):
            build(scheme, act_bits=5, fused="eager")
        with pytest.raises(ValueError, match=r"keyword option\(s\) act_bits: "):
            build(scheme, 3)  # positional act_bits
    assert granq_ao.get_granq_qconfig(scheme, fused=None).activation().bits == 3  # None: legacy "auto", the default
    assert granq_ao.get_granq_qconfig(scheme, averaging_constant=0.1).activation().activation_post_process.averaging_constant == 0.1
    assert granq_ao.get_granq_qat_qconfig_mapping(scheme, backend="qnnpack").scheme is scheme


def test_fused_defaults_to_auto_everywhere():
    import inspect

    for function in (granq_ao.get_granq_qconfig, granq_ao.get_granq_qat_qconfig_mapping, GranQFakeQuantize,
                     granq_ao.GranQScheme.from_kwargs, granq_ao.fake_quantize):
        assert inspect.signature(function).parameters["fused"].default == "auto", function
    assert GranQFakeQuantize(bits=3).fused == "auto"
    assert GranQFakeQuantize(bits=3, fused=None).fused == "auto"  # the legacy spelling still works
    assert granq_ao.get_granq_qconfig(fused=None).activation().fused == "auto"


def test_qconfig_bits_reach_the_modules():
    qconfig = granq_ao.get_granq_qconfig(weight_bits=3, act_bits=5, weight_granularity="kernel")
    activation, weight = qconfig.activation(), qconfig.weight()
    assert (activation.bits, activation.granularity.name, activation.ch_axis) == (5, "granq", 1)
    assert (weight.bits, weight.ch_axis, weight.dtype) == (3, 0, torch.qint8)
    assert weight.granularity == granq_ao.PerSampleChannel(axis=1)
    assert weight.qscheme == torch.per_channel_affine  # static export: per output channel


@pytest.mark.parametrize("activation, kept", [
    (nn.ReLU(), 1),        # conv-bn-relu fuses into ConvBnReLU2d: its output is a ReLU output
    (nn.ReLU6(), 1),
    (nn.LeakyReLU(0.1), 0),  # signed outputs: not a paper quantization point
    (nn.PReLU(), 0),
])
def test_paper_placement_keeps_only_relu_outputs(activation, kept):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), activation, nn.Conv2d(8, 4, 1))
    qmap = granq_ao.get_granq_qat_qconfig_mapping(4, 4, act_placement="paper", fused=False)
    prepared = granq_ao.prepare_qat_fx(model.train(), qmap, (torch.randn(2, 3, 8, 8),))
    assert count_activation_fake_quant_calls(prepared) == kept
    prepared(torch.randn(2, 3, 8, 8)).sum().backward()
