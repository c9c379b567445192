"""What the upstream suites rely on (issue 20, item 5), checked with GranQ in place of their
quantizers: torch.ao's FakeQuantize contract (flag toggles through torch.ao's functions,
state round trips, deepcopy/pickle of a fresh and a used fake-quant), torchvision's QAT
reference script (SyncBatchNorm swap of a prepared model), and torchao's PT2E QAT tests' model
shapes (dict outputs, attention, embedding + linear mixes). Rank-1 inputs and TorchScript, where
GranQ differs by design, are in docs/RELIABILITY.md and checked at the end.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.ao.quantization import disable_fake_quant, disable_observer, enable_fake_quant, enable_observer
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

import granq_ao
from granq_ao import GranQFakeQuantize
from granq_ao.integrations.torchao import (GranQQuantizer, export_for_qat, granq_fake_quant_calls,
                                           move_exported_model_to_eval)


def mapping(**options):
    return granq_ao.get_granq_qat_qconfig_mapping(weight_bits=4, act_bits=4, **options)


# ----------------------------------------------------------------------------- FakeQuantize contract
def test_flag_toggles_through_torch_ao_functions_and_state_dict():
    fq = GranQFakeQuantize(bits=3)
    x = torch.randn(4, 3, 5, 5)
    quantized = fq(x)
    fq.apply(disable_fake_quant)
    assert torch.equal(fq(x), x) and fq.fake_quant_enabled.item() == 0
    fq.apply(disable_observer)
    seen = fq.activation_post_process.min_val.clone()
    fq(x * 10)
    assert torch.equal(fq.activation_post_process.min_val, seen)  # observer off: nothing recorded
    state = copy.deepcopy(fq.state_dict())
    fresh = GranQFakeQuantize(bits=3)
    fresh.load_state_dict(state)  # the flags travel with the state_dict and are read by forward
    assert torch.equal(fresh(x), x)
    fresh.apply(enable_fake_quant)
    fresh.apply(enable_observer)
    assert torch.equal(fresh(x), quantized)


@pytest.mark.parametrize("used", [False, True])
def test_deepcopy_and_pickle_of_a_fake_quant(used):
    fq = GranQFakeQuantize(bits=4)
    x = torch.randn(2, 3, 4, 4)
    if used:
        fq(x)
    for copied in (copy.deepcopy(fq), pickle.loads(pickle.dumps(fq))):
        assert torch.equal(copied(x), fq(x))
        assert copied.state_dict().keys() == fq.state_dict().keys()
    buffer = io.BytesIO()
    torch.save(fq, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), fq(x))


# ----------------------------------------------------------------------------- torchvision's QAT script
def test_syncbn_swap_of_a_prepared_model_keeps_its_numbers():
    """train_quantization.py fuses, prepares, then swaps BatchNorm for SyncBatchNorm under DDP (the
    BN inside the fused QAT ConvBnReLU2d): the fake-quants stay and, in eval form (no process group
    needed), the numbers do too. (An *unfused* prepared BN would lose its output fake-quant in the
    swap: torch's convert_sync_batchnorm copies children, not forward hooks.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.ReLU())
    x = torch.randn(2, 3, 8, 8)
    eager = torch.ao.quantization.fuse_modules_qat(copy.deepcopy(model).train(), [["0", "1", "2"], ["3", "4"]])
    eager.qconfig = granq_ao.get_granq_qconfig(4, 4)  # fuse, qconfig, prepare_qat, then SyncBN: the script's order
    torch.ao.quantization.prepare_qat(eager, inplace=True)
    eager(x)
    eager.eval()
    expected = eager(x)
    swapped = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(eager))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in swapped.modules())
    assert (granq_ao.count_activation_fake_quant_calls(swapped)
            == granq_ao.count_activation_fake_quant_calls(eager) > 0)
    with torch.no_grad():
        assert torch.equal(swapped(x), expected)


# ----------------------------------------------------------------------------- model shapes
class DictOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 5)

    def forward(self, x):
        features = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return {"features": features, "logits": self.fc(features)}


class EmbeddingThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding, self.fc1, self.fc2 = nn.Embedding(20, 8), nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, tokens):
        return self.fc2(torch.relu(self.fc1(self.embedding(tokens))))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.attention, self.head = nn.Linear(6, 8), nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.proj(x))
        attended, _ = self.attention(h, h, h, need_weights=False)
        return self.head(attended + h)


def _inputs(kind):
    torch.manual_seed(1)
    if kind == "embedding":
        return (torch.randint(0, 20, (4, 7)),)
    if kind == "attention":
        return (torch.randn(4, 5, 6),)
    return (torch.randn(4, 3, 8, 8),)


MODELS = {"dict": DictOutput, "embedding": EmbeddingThenLinear, "attention": Attention}


def _equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return torch.equal(a, b)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_fx_prepare_train_convert(kind):
    torch.manual_seed(0)
    model = MODELS[kind]().eval()
    inputs = _inputs(kind)
    qat = granq_ao.prepare_qat_fx(copy.deepcopy(model).train(), mapping(), inputs)
    assert granq_ao.count_activation_fake_quant_calls(qat) > 0
    out = qat(*inputs)
    loss = sum(v.square().sum() for v in out.values()) if isinstance(out, dict) else out.square().sum()
    loss.backward()
    assert all(p.grad is not None for p in qat.parameters() if p.requires_grad and p.dim() > 1
               and p.shape != model.state_dict().get("embedding.weight", torch.empty(0)).shape)
    qat.eval()
    with torch.no_grad():
        assert _equal(granq_ao.convert_to_reference_fx(qat)(*inputs), qat(*inputs))


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_pt2e_prepare_convert(kind):
    torch.manual_seed(0)
    model = MODELS[kind]().eval()
    inputs = _inputs(kind)
    prepared = prepare_qat_pt2e(export_for_qat(model, inputs), GranQQuantizer(weight_bits=4, act_bits=4))
    calls = granq_fake_quant_calls(prepared)
    expected_weights = {"dict": 2, "embedding": 2, "attention": 4}[kind]  # attention: in_proj, out_proj
    assert len(calls["weight"]) == expected_weights
    assert len(calls["activation"]) > 0
    move_exported_model_to_eval(prepared)
    with torch.no_grad():
        expected = prepared(*inputs)
        assert _equal(convert_pt2e(copy.deepcopy(prepared))(*inputs), expected)


# ----------------------------------------------------------------------------- by design
def test_rank_one_activation_is_refused_with_granq_ranges():
    """GranQ needs (batch, channel): a rank-1 tensor has no per-(n, c) range. torch.ao's
    per-tensor fake-quant takes it; GranQ refuses it (tensor granularity takes it)."""
    with pytest.raises(ValueError, match="rank"):
        GranQFakeQuantize(bits=4)(torch.randn(5))
    assert GranQFakeQuantize(bits=4, granularity="tensor")(torch.randn(5)).shape == (5,)


def test_torchscript_of_a_prepared_model_is_not_supported():
    """torch.ao's FakeQuantize scripts; GranQ's forward (Python-side flags, autograd Function,
    error labelling) does not: TorchScript is deprecated upstream, use torch.export."""
    with pytest.raises(Exception):
        torch.jit.script(GranQFakeQuantize(bits=4))
