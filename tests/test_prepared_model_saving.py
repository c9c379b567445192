"""Prepared models that save and load: whole-model pickling (FX and eager) into a fresh process,
observers and conversion after loading, and state_dicts refused when their quantization settings differ.
docs/RELIABILITY.md lists what each test guarantees."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import granq_ao
from conftest import prepare


ROOT = Path(__file__).resolve().parents[1]


def run_fresh(code: str) -> str:
    """Run ``code`` in a new interpreter that imports this checkout's granq_ao; its stdout."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               GRANQ_FUSED="eager")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


class Mixed(nn.Module):
    """Conv-BN-ReLU (fused QAT module), sigmoid (torch.ao's fixed-qparams fake-quant), reshape
    (torch.ao's reuse-input observer), LayerNorm (torch.ao's weight qconfig), Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        y = torch.sigmoid(y).reshape(y.shape[0], 4, 36)[..., :6]
        return self.fc(self.norm(y))


def test_prepared_qat_model_pickles_and_loads_in_a_fresh_process(tmp_path):
    """torch.save of a prepared model failed on torch.ao's local factory_kwargs function stored in
    every module's qconfig. Loaded in a new interpreter, the model computes the same numbers,
    trains on, and converts to the same reference model."""
    torch.manual_seed(0)
    qat = prepare(Mixed(), torch.randn(2, 3, 8, 8))
    qat(torch.randn(4, 3, 8, 8))  # observers and BN statistics hold data
    x = torch.randn(3, 3, 8, 8)
    qat.eval()
    expected = qat(x)
    expected_ref = granq_ao.convert_to_reference_fx(qat)(x)
    path = tmp_path / "qat.pt"
    torch.save({"model": qat, "x": x, "expected": expected, "ref": expected_ref}, path)
    out = run_fresh(
        "import torch, granq_ao\n"
        f"d = torch.load({str(path)!r}, weights_only=False)\n"
        "m = d['model']\n"
        "assert torch.equal(m(d['x']), d['expected'])\n"
        "assert torch.equal(granq_ao.convert_to_reference_fx(m)(d['x']), d['ref'])\n"
        "m.train(); m(d['x']).sum().backward()\n"
        "assert m.conv.weight.grad is not None and m.conv.weight.grad.abs().sum() > 0\n"
        "print('ok')\n")
    assert out.strip() == "ok"


class ConvBnReluConvBnPool(nn.Module):
    """The pooling op reuses its input's fake-quant: torch.ao registers that one instance under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


@pytest.mark.parametrize("round_trip", ["torch.save", "pickle", "deepcopy"])
def test_state_dict_survives_pickling_of_a_shared_fake_quant(round_trip):
    """Pickling re-traces the graph and keeps one name per module: a prepared model whose pooling
    shares its input's fake-quant lost that fake-quant's second name (activation_post_process_3)
    from its state_dict. granq_ao.prepare_qat_fx calls the shared instance by one name, so the
    saved and the loaded model have the same keys and load each other's state_dicts strictly."""
    import copy
    import io
    import pickle

    from torch.ao.quantization.quantize_fx import prepare_qat_fx as torch_prepare_qat_fx

    from granq_ao.integrations.torch_ao import GranQSharedFakeQuantize
    from granq_ao.integrations.torch_ao.placement import activation_fake_quant_calls

    torch.manual_seed(0)
    example = torch.randn(2, 3, 8, 8)
    mapping = granq_ao.get_granq_qat_qconfig_mapping(4, 4, fused="eager")
    torch_prepared = torch_prepare_qat_fx(ConvBnReluConvBnPool().train(), mapping, (example,))
    aliased = dict(torch_prepared.named_modules(remove_duplicate=False))
    assert aliased["activation_post_process_3"] is aliased["activation_post_process_2"]  # the case at hand
    qat = prepare(ConvBnReluConvBnPool(), example)
    calls = activation_fake_quant_calls(qat)
    # the pooling's call reuses the qparams of its input's call (a shared follower of that instance)
    assert len(calls) == 4 and isinstance(calls[3], GranQSharedFakeQuantize) and calls[3].owner is calls[2]
    names = dict(qat.named_modules(remove_duplicate=False))
    assert names["activation_post_process_3"] is calls[3] and names["activation_post_process_2"] is calls[2]
    qat(torch.randn(4, 3, 8, 8))  # observers and BN statistics hold data
    if round_trip == "torch.save":
        buffer = io.BytesIO()
        torch.save(qat, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    elif round_trip == "pickle":
        loaded = pickle.loads(pickle.dumps(qat))
    else:
        loaded = copy.deepcopy(qat)
    assert list(loaded.state_dict()) == list(qat.state_dict())
    loaded.load_state_dict(qat.state_dict(), strict=True)
    qat.load_state_dict(loaded.state_dict(), strict=True)
    fresh = prepare(ConvBnReluConvBnPool(), example)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(loaded.eval()(x), qat.eval()(x)) and torch.equal(fresh.eval()(x), qat(x))


def test_torch_prepare_with_granq_mapping_pickles_too():
    """The mapping's constructors (GranQ's and the torch.ao ones it keeps) pickle, so torch's own
    prepare_qat_fx with a GranQ mapping gives a picklable model as well."""
    from torch.ao.quantization.quantize_fx import prepare_qat_fx as torch_prepare_qat_fx
    import io
    import pickle

    mapping = granq_ao.get_granq_qat_qconfig_mapping(4, 4, fused="eager")
    qat = torch_prepare_qat_fx(Mixed().train(), mapping, (torch.randn(2, 3, 8, 8),))
    for name, module in qat.named_modules():
        if getattr(module, "qconfig", None) is not None:
            pickle.dumps(module.qconfig)  # raised on the local factory_kwargs function
    buffer = io.BytesIO()
    torch.save(qat, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded.eval()(x), qat.eval()(x))


def test_prepared_model_pickles_with_torch_default_mapping_and_a_granq_global_qconfig():
    """granq_ao.prepare_qat_fx makes every stored qconfig picklable, whatever mapping it came from:
    torch's default mapping keeps torch.ao's own fixed-qparams constructors (sigmoid), which carry
    the same local function."""
    import io

    from torch.ao.quantization import get_default_qat_qconfig_mapping

    mapping = get_default_qat_qconfig_mapping("x86").set_global(granq_ao.get_granq_qconfig(4, 4, fused="eager"))
    qat = granq_ao.prepare_qat_fx(Mixed().train(), mapping, (torch.randn(2, 3, 8, 8),))
    buffer = io.BytesIO()
    torch.save(qat, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded.eval()(x), qat.eval()(x))
    assert torch.equal(granq_ao.convert_to_reference_fx(loaded)(x), granq_ao.convert_to_reference_fx(qat)(x))


def test_loaded_observer_records_its_first_batch():
    """A GranQObserver saved before any batch (empty per-channel buffers) and loaded by torch.load
    got buffers whose storage cannot be resized: its first batch raised "Trying to resize storage
    that is not resizable"; so did load_state_dict of another channel count into a loaded one."""
    import io

    buffer = io.BytesIO()
    torch.save(granq_ao.GranQObserver(bits=4), buffer)
    buffer.seek(0)
    observer = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 3, 4, 4)
    observer(x)
    assert torch.equal(observer.min_val, x.amin(dim=(0, 2, 3)))
    other = granq_ao.GranQObserver(bits=4)
    other(torch.randn(2, 5, 4, 4))
    observer.load_state_dict(other.state_dict())
    assert torch.equal(observer.max_val, other.max_val)


def test_eager_prepared_model_pickles():
    """Eager-mode prepare_qat stores the (now picklable) qconfig on every module as well."""
    import io

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    model.qconfig = granq_ao.get_granq_qconfig(4, 4, fused="eager")
    qat = torch.ao.quantization.prepare_qat(model.train())
    buffer = io.BytesIO()
    torch.save(qat, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(loaded(x), qat(x))


def test_converting_a_loaded_torch_prepared_model_says_what_to_do():
    """torch.ao keeps its prepare metadata in GraphModule.meta, which pickling drops: a model
    prepared by torch's prepare_qat_fx and loaded again cannot be converted; say so."""
    import io

    from torch.ao.quantization.quantize_fx import prepare_qat_fx as torch_prepare_qat_fx

    mapping = granq_ao.get_granq_qat_qconfig_mapping(4, 4, fused="eager")
    qat = torch_prepare_qat_fx(nn.Sequential(nn.Conv2d(3, 4, 3)).train(), mapping, (torch.randn(1, 3, 6, 6),))
    buffer = io.BytesIO()
    torch.save(qat, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with pytest.raises(ValueError, match="holds no prepare metadata.*granq_ao.prepare_qat_fx.*load_state_dict"):
        granq_ao.convert_to_reference_fx(loaded.eval())


def test_preparing_a_prepared_model_is_refused():
    """torch.ao's prepare_qat_fx on a prepared model failed with a Proxy TypeError."""
    example = (torch.randn(1, 3, 6, 6),)
    qat = prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), example[0])
    mapping = granq_ao.get_granq_qat_qconfig_mapping(4, 4)
    with pytest.raises(ValueError, match="already prepared.*Pass the float model.*load_state_dict"):
        granq_ao.prepare_qat_fx(qat, mapping, example)
    eager = nn.Sequential(nn.Conv2d(3, 4, 3))
    eager.qconfig = granq_ao.get_granq_qconfig(4, 4)
    eager = torch.ao.quantization.prepare_qat(eager.train())
    with pytest.raises(ValueError, match="already prepared"):
        granq_ao.prepare_qat_fx(eager, mapping, example)


@pytest.mark.parametrize("other", [dict(weight_bits=8, act_bits=8), dict(symmetric_acts=True),
                                   dict(act_granularity="tensor"), dict(weight_granularity="kernel")])
def test_state_dict_from_other_quantization_settings_is_refused(other):
    """A 4-bit state_dict loaded silently into a model prepared with 8 bits (or symmetric): the
    settings that shape the numbers travel with the state_dict and are compared on load."""
    def build(**kwargs):
        torch.manual_seed(0)
        return prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), torch.randn(1, 3, 5, 5), **kwargs)

    trained = build(weight_bits=4, act_bits=4)
    trained(torch.randn(2, 3, 5, 5))
    state = trained.state_dict()
    same = build(weight_bits=4, act_bits=4)
    same.load_state_dict(state)
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(same.eval()(x), trained.eval()(x))
    with pytest.raises(RuntimeError, match=r"saved from a 4-bit asymmetric .* this one is .*Prepare the model "
                                           r"with the settings it was trained with"):
        build(**{"weight_bits": 4, "act_bits": 4, **other}).load_state_dict(state)
    # a state_dict saved before the settings were saved still loads
    build(weight_bits=4, act_bits=4).load_state_dict({k: v for k, v in state.items() if "_extra_state" not in k})
