"""torch.ao eager mode (torchvision's quantizable models): prepare_qat with GranQ qconfigs,
training, granq_ao.convert_eager (== the QAT model in eval), torch's convert refused, pickling."""
from __future__ import annotations

import copy
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.ao.quantization import DeQuantStub, QuantStub

import granq_ao
from granq_ao.integrations.torch_ao import DynamicQuantDequant, weight_codes
from granq_ao.integrations.torch_ao.convert import ConvBnEval
from granq_ao.integrations.torch_ao.eager_guard import TORCH_EAGER_CONVERT_MESSAGE

tv_quantization = pytest.importorskip("torchvision.models.quantization")

REPO = Path(__file__).resolve().parents[1]
REFUSED = r"torch\.ao\.quantization\.convert cannot convert a GranQ model.*Use granq_ao\.convert_eager\(model\)"


def granq_eager_qat(model: nn.Module, **qconfig_kwargs) -> nn.Module:
    """torchvision's eager QAT recipe (references/classification/train_quantization.py) with GranQ."""
    qconfig_kwargs.setdefault("fused", False)  # eager elementwise path: no torch.compile in tests
    model.train()
    model.fuse_model(is_qat=True)
    model.qconfig = granq_ao.get_granq_qconfig(4, 4, **qconfig_kwargs)
    torch.ao.quantization.prepare_qat(model, inplace=True)
    return model


def act_hosts(model: nn.Module) -> Counter:
    """Class names of the modules carrying a GranQ activation fake-quant."""
    return Counter(type(module).__name__ for module in model.modules()
                   if isinstance(getattr(module, "activation_post_process", None), granq_ao.GranQFakeQuantize)
                   and not isinstance(module, granq_ao.GranQFakeQuantize))


def weight_fake_quants(model: nn.Module) -> list:
    return [module for name, module in model.named_modules()
            if name.endswith("weight_fake_quant") and isinstance(module, granq_ao.GranQFakeQuantize)]


def activation_calls_in_forward(model: nn.Module, x: torch.Tensor) -> int:
    """GranQ activation fake-quant calls that one forward really makes (weight ones excluded)."""
    weights = {id(module) for module in weight_fake_quants(model)}
    calls = []
    handles = [module.register_forward_pre_hook(lambda module, args: calls.append(module))
               for module in model.modules()
               if isinstance(module, granq_ao.GranQFakeQuantize) and id(module) not in weights]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return len(calls)


@pytest.fixture(scope="module")
def resnet():
    """A GranQ W4A4 eager QAT resnet18 (10 classes), trained for two SGD steps."""
    torch.manual_seed(0)
    qat = granq_eager_qat(tv_quantization.resnet18(weights=None, quantize=False, num_classes=10))
    x, target = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    before = {name: p.detach().clone() for name, p in qat.named_parameters()}
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(2):
        loss = nn.functional.cross_entropy(qat(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return SimpleNamespace(qat=qat.eval(), x=x, before=before, losses=losses)


def test_prepare_qat_inserts_granq_fake_quants_where_eager_mode_observes(resnet):
    """resnet18 after fuse_model(is_qat=True) + prepare_qat: one activation fake-quant on the
    output of each observed module (hook), one weight fake-quant per conv/linear.

    Activations, 30: QuantStub (the input image) 1, stem ConvBnReLU2d 1, per BasicBlock (8) its
    ConvBnReLU2d, its ConvBn2d and its add_relu FloatFunctional (8 * 3 = 24), the 3 downsample
    ConvBn2d, fc 1. Nothing on maxpool, avgpool, flatten, DeQuantStub or the Identity left by
    fusion (eager mode observes only modules in its propagation list).
    Weights, 21: the 20 convs and fc."""
    qat = resnet.qat
    assert act_hosts(qat) == Counter({"ConvBn2d": 11, "ConvBnReLU2d": 9, "FloatFunctional": 8,
                                      "Linear": 1, "QuantStub": 1})
    assert len(weight_fake_quants(qat)) == 21
    assert all(fq.bits == 4 and fq.ch_axis == 0 for fq in weight_fake_quants(qat))
    acts = granq_ao.integrations.torch_ao.activation_fake_quant_calls(qat)
    assert all(fq.bits == 4 and fq.config.name == "granq" and fq.ch_axis == 1 for fq in acts)
    # the counter: eager models count one call site per module carrying a GranQ fake-quant
    assert granq_ao.count_activation_fake_quant_calls(qat) == 30
    assert activation_calls_in_forward(qat, resnet.x) == 30  # and resnet18 calls each once


def test_count_on_mobilenet_v2_counts_attached_fake_quants():
    """mobilenet_v2: 71 = QuantStub 1 + 35 ConvBnReLU2d (stem, 16 expansions, 17 depthwise,
    last conv) + 17 ConvBn2d (projections) + 17 skip_add FloatFunctional + classifier 1; weights:
    52 convs + 1 linear. Every block owns a skip_add but only the 10 with a residual call it, so
    one forward makes 64 activation fake-quant calls: the eager count is of attached call sites."""
    torch.manual_seed(0)
    qat = granq_eager_qat(tv_quantization.mobilenet_v2(weights=None, quantize=False, num_classes=10))
    assert act_hosts(qat) == Counter({"ConvBnReLU2d": 35, "ConvBn2d": 17, "FloatFunctional": 17,
                                      "Linear": 1, "QuantStub": 1})
    assert granq_ao.count_activation_fake_quant_calls(qat) == 71
    assert len(weight_fake_quants(qat)) == 53
    used_skip_adds = sum(block.use_res_connect for block in qat.modules()
                         if isinstance(block, tv_quantization.mobilenetv2.QuantizableInvertedResidual))
    assert used_skip_adds == 10
    assert activation_calls_in_forward(qat.eval(), torch.randn(2, 3, 32, 32)) == 71 - 17 + 10


def test_training_steps_train_the_qat_model(resnet):
    assert all(torch.isfinite(torch.tensor(loss)) for loss in resnet.losses), resnet.losses
    assert resnet.losses[-1] < resnet.losses[0], resnet.losses
    changed = [name for name, p in resnet.qat.named_parameters() if not torch.equal(p, resnet.before[name])]
    assert "conv1.weight" in changed and "fc.weight" in changed and "layer4.1.conv2.bn.weight" in changed
    # the activation observers recorded running ranges (for a static export)
    assert resnet.qat.conv1.activation_post_process.activation_post_process.min_val.numel() == 64


@pytest.mark.numerics
def test_convert_eager_equals_the_qat_model_in_eval(resnet):
    qat, x = resnet.qat, resnet.x
    expected = qat(x)
    ref = granq_ao.convert_eager(qat)
    assert torch.equal(ref(x), expected)
    assert torch.equal(ref(x[:1]), qat(x[:1]))  # per-sample ranges: any batch size
    # the QAT model is untouched (a copy was converted) ...
    assert granq_ao.count_activation_fake_quant_calls(qat) == 30
    assert granq_ao.count_activation_fake_quant_calls(ref) == 0
    # ... the reference holds no fake-quant, no stub, no qconfig; q/dq modules where QAT had them
    assert not any(isinstance(m, (granq_ao.GranQFakeQuantize, granq_ao.GranQObserver, QuantStub, DeQuantStub))
                   for m in ref.modules())
    assert not any(hasattr(m, "qconfig") for m in ref.modules())
    assert sum(isinstance(m, DynamicQuantDequant) for m in ref.modules()) == 30
    assert isinstance(ref.conv1, ConvBnEval) and isinstance(ref.fc, nn.Linear)
    assert isinstance(ref.layer1[0].add_relu.activation_post_process, DynamicQuantDequant)
    # weights are the QAT model's fake-quantized weights, on the 4-bit grid
    assert torch.equal(ref.fc.weight, qat.fc.weight_fake_quant(qat.fc.weight))
    assert int(weight_codes(ref.fc).max()) <= 15 and weight_codes(ref.fc).dtype == torch.uint8
    # the activation quantization matters: without it the numbers differ
    acts = granq_ao.integrations.torch_ao.activation_fake_quant_calls(qat)
    try:
        for fake_quant in acts:
            fake_quant.disable_fake_quant()
        assert not torch.equal(qat(x), expected)
    finally:
        for fake_quant in acts:
            fake_quant.enable_fake_quant()


def test_torch_eager_convert_is_refused_at_once(resnet):
    """torch's eager convert stops at the first GranQ quantizer it asks for qparams, before it
    builds any quantized module. The default (inplace=False) leaves the QAT model intact."""
    qat = copy.deepcopy(resnet.qat)
    expected = resnet.qat(resnet.x)
    with pytest.raises(RuntimeError, match=REFUSED):
        torch.ao.quantization.convert(qat)
    with pytest.raises(RuntimeError, match=REFUSED):
        torch.ao.quantization.convert(qat, is_reference=True)
    with pytest.raises(RuntimeError, match=REFUSED):
        torch.ao.quantization.quantize_qat(qat, lambda model: None, ())
    assert torch.equal(qat(resnet.x), expected)
    # in place: no module swapped (torch has already folded the first Conv-BN's BatchNorm into
    # that QAT module's weight, before any GranQ code runs: use a copy, as torch's default does)
    with pytest.raises(RuntimeError, match=REFUSED):
        torch.ao.quantization.convert(qat, inplace=True)
    assert [type(m) for m in qat.modules()] == [type(m) for m in resnet.qat.modules()]
    assert granq_ao.count_activation_fake_quant_calls(qat) == 30
    # outside torch's eager convert the static qparams stay available (static export)
    scale, zero_point = resnet.qat.conv1.activation_post_process.calculate_qparams()
    assert scale.shape == (64,) and zero_point.dtype == torch.int64
    assert "granq_ao.convert_eager(model)" in TORCH_EAGER_CONVERT_MESSAGE


def test_converted_model_pickles_and_loads_in_a_fresh_process(resnet, tmp_path):
    """torch.save of the whole reference model; a new interpreter that does not import granq_ao
    itself loads it (unpickling imports it: the hooks and modules are granq_ao's)."""
    ref = granq_ao.convert_eager(resnet.qat)
    expected = resnet.qat(resnet.x)
    path = tmp_path / "ref.pt"
    torch.save({"model": ref, "x": resnet.x, "expected": expected}, path)
    assert torch.equal(torch.load(path, weights_only=False)["model"](resnet.x), expected)
    code = ("import sys, torch; d = torch.load(%r, weights_only=False); "
            "assert 'granq_ao' in sys.modules; "
            "assert torch.equal(d['model'](d['x']), d['expected']); print('ok')" % str(path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


class _Tiny(nn.Module):
    """QuantStub -> conv-bn-relu -> y * hardsigmoid(y) (FloatFunctional.mul) -> pool -> fc -> DeQuantStub."""

    def __init__(self, bn: bool = True) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4) if bn else nn.Identity(), nn.ReLU()
        self.gate = nn.Hardsigmoid()
        self.mul = torch.ao.nn.quantized.FloatFunctional()
        self.fc = nn.Linear(4, 3)
        self.dequant = DeQuantStub()

    def fuse_model(self, is_qat: bool = True) -> None:
        fuse = ["conv", "bn", "relu"] if isinstance(self.bn, nn.BatchNorm2d) else ["conv", "relu"]
        torch.ao.quantization.fuse_modules_qat(self, [fuse], inplace=True)

    def forward(self, x):
        y = self.conv(self.quant(x))
        y = self.mul.mul(y, self.gate(y)).mean((2, 3))
        return self.dequant(self.fc(y))


@pytest.mark.parametrize("bn", [True, False], ids=["conv_bn_relu", "conv_relu"])
@pytest.mark.parametrize("averaging_constant", [0.01, 1.0])
def test_convert_eager_pre_hooks_torch_fake_quants_and_user_hooks(averaging_constant, bn):
    """averaging_constant=1 makes torch.ao treat the observer as memoryless: it quantizes module
    INPUTS (forward pre-hooks). torch.ao's own fixed-qparams fake-quant (Hardsigmoid) stays;
    a user's forward hook on a replaced module stays; NaN input names the q/dq module. Without BN
    the conv becomes a fused nn.Sequential (ConvReLU2d), which calls every child."""
    torch.manual_seed(0)
    qat = granq_eager_qat(_Tiny(bn), averaging_constant=averaging_constant)
    pre = averaging_constant == 1.0
    hooks = qat.conv._forward_pre_hooks if pre else qat.conv._forward_hooks
    assert len(hooks) == 1
    assert not isinstance(qat.gate.activation_post_process, granq_ao.GranQFakeQuantize)
    qat.fc.register_forward_hook(lambda module, args, output: output * 2 + 1)
    x = torch.randn(3, 3, 8, 8)
    qat(x)
    qat.eval()
    expected = qat(x)
    ref = granq_ao.convert_eager(qat)
    assert torch.equal(ref(x), expected)
    conv_quantizer = ref.conv[0].activation_post_process if pre and not bn else ref.conv.activation_post_process
    assert isinstance(conv_quantizer, DynamicQuantDequant)
    assert type(ref.gate.activation_post_process) is type(qat.gate.activation_post_process)
    # the q/dq hook where torch.ao had its observer hook (output hooks: first), then the user's
    fc_hooks = [hook.__name__ for hook in ref.fc._forward_hooks.values()]
    assert fc_hooks == (["<lambda>"] if pre else ["_quantize_output_hook", "<lambda>"])
    if bn:
        conv_hooks = ref.conv._forward_pre_hooks if pre else ref.conv._forward_hooks
        assert [hook.__name__ for hook in conv_hooks.values()] == [
            "_quantize_input_pre_hook" if pre else "_quantize_output_hook"]
    else:  # ConvReLU2d(Conv2d, ReLU): output q/dq as its last child, input q/dq on the Conv2d
        assert type(ref.conv) is torch.ao.nn.intrinsic.ConvReLU2d
        assert not ref.conv._forward_hooks and not ref.conv._forward_pre_hooks
        assert list(ref.conv._modules) == (["0", "1"] if pre else ["0", "1", "activation_post_process"])
        assert hasattr(ref.conv[0], "activation_post_process") == pre
    # a disabled fake-quant becomes an identity (as in QAT); fold_bn: equal up to float rounding
    qat.fc.activation_post_process.disable_fake_quant()
    expected = qat(x)
    ref = granq_ao.convert_eager(qat)
    assert isinstance(ref.fc.activation_post_process, nn.Identity) and torch.equal(ref(x), expected)
    folded = granq_ao.convert_eager(qat, fold_bn=True)
    assert type(folded.conv) is torch.ao.nn.intrinsic.ConvReLU2d
    with torch.no_grad():  # conv + relu without the q/dq: QAT's forward (no hooks) up to rounding
        assert torch.allclose(folded.conv[1](folded.conv[0].forward(x)), qat.conv.forward(x), atol=1e-5)
    assert torch.allclose(folded(x), expected, atol=0.05)  # 4-bit rounding may flip on 1e-7 changes
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(granq_ao.NonFiniteInputError, match="DynamicQuantDequant 'quant.activation_post_process'"):
        ref(bad)
    with pytest.raises(RuntimeError, match=REFUSED):
        torch.ao.quantization.convert(qat)


def test_convert_eager_rejects_what_it_cannot_convert():
    with pytest.raises(ValueError, match="holds no GranQ fake-quant"):
        granq_ao.convert_eager(_Tiny())
    graph_module = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="convert_to_reference_fx"):
        granq_ao.convert_eager(graph_module)


def test_readme_eager_snippet_runs(monkeypatch, tmp_path):
    """The README's eager-mode snippet, as written (the eager elementwise path: no compiling)."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Eager mode (torchvision quantizable models)", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.setenv("GRANQ_FUSED", "0")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert isinstance(namespace["ref"].fc.activation_post_process, DynamicQuantDequant)
    assert (tmp_path / "resnet18_granq_ref.pt").exists()
