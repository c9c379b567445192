"""torch's own FX converters on GranQ-prepared models (issue 20, items 2 and 4).

* torch's lowered ``convert_fx`` is refused at convert time with the way out (it used to return a
  static reference graph that raised ``Expected quantizer->qscheme() == kPerTensorAffine`` in
  ``F.hardsigmoid`` at the first forward on MobileNetV3);
* torch's ``convert_to_reference_fx`` (is_reference=True) keeps working;
* a model prepared by torch's ``prepare_qat_fx``, saved whole and loaded, is refused by
  ``granq_ao.convert_to_reference_fx`` with an error that says how to save so that it converts;
  the same round trip after ``granq_ao.prepare_qat_fx`` converts, in a fresh process too.
"""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch.ao.quantization.quantize_fx import convert_fx as torch_convert_fx
from torch.ao.quantization.quantize_fx import convert_to_reference_fx as torch_convert_to_reference_fx
from torch.ao.quantization.quantize_fx import prepare_qat_fx as torch_prepare_qat_fx

import granq_ao

torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def mobilenet_v3_small():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    return model, x


@pytest.mark.parametrize("placement", ["all", "paper"])
def test_torch_convert_fx_refuses_at_convert_time(mobilenet_v3_small, placement):
    model, x = mobilenet_v3_small
    mapping = granq_ao.get_granq_qat_qconfig_mapping(weight_bits=4, act_bits=4, act_placement=placement)
    qat = granq_ao.prepare_qat_fx(copy.deepcopy(model).train(), mapping, (x,))
    qat(x)
    qat.eval()
    with pytest.raises(RuntimeError, match=r"convert_fx cannot lower a GranQ model.*granq_ao\.convert_to_reference_fx"):
        torch_convert_fx(copy.deepcopy(qat))
    # granq_ao's converter on the same model: runs, and equals QAT eval
    with torch.no_grad():
        expected = qat(x)
        assert torch.equal(granq_ao.convert_to_reference_fx(qat)(x), expected)


def test_torch_convert_to_reference_fx_still_runs(mobilenet_v3_small):
    """The reference path (is_reference=True) is not refused: torch's static reference graph runs."""
    model, x = mobilenet_v3_small
    mapping = granq_ao.get_granq_qat_qconfig_mapping(weight_bits=4, act_bits=4)
    qat = granq_ao.prepare_qat_fx(copy.deepcopy(model).train(), mapping, (x,))
    qat(x)
    reference = torch_convert_to_reference_fx(copy.deepcopy(qat).eval())
    with torch.no_grad():
        assert torch.isfinite(reference(x)).all()


def _small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4)).eval()


def test_torch_prepared_model_saved_whole_is_refused_with_how_to_save(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    mapping = granq_ao.get_granq_qat_qconfig_mapping(weight_bits=4, act_bits=4)
    qat = torch_prepare_qat_fx(_small_model().train(), mapping, (x,))
    qat(x)
    torch.save(qat, tmp_path / "qat.pt")
    loaded = torch.load(tmp_path / "qat.pt", weights_only=False)
    with pytest.raises(ValueError, match=r"pickling drops GraphModule\.meta.*state_dict\(\)"):
        granq_ao.convert_to_reference_fx(loaded.eval())
    # what the message says works: the state_dict, loaded into a freshly prepared model
    fresh = torch_prepare_qat_fx(_small_model().train(), mapping, (x,))
    fresh.load_state_dict(torch.load(tmp_path / "qat.pt", weights_only=False).state_dict())
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(granq_ao.convert_to_reference_fx(fresh)(x), loaded(x))


def test_granq_prepared_model_saved_whole_converts_in_a_fresh_process(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    mapping = granq_ao.get_granq_qat_qconfig_mapping(weight_bits=4, act_bits=4)
    qat = granq_ao.prepare_qat_fx(_small_model().train(), mapping, (x,))
    qat(x)
    qat.eval()
    torch.save({"model": qat, "x": x, "y": qat(x).detach()}, tmp_path / "qat.pt")
    code = (
        "import torch, granq_ao\n"
        f"saved = torch.load({str(tmp_path / 'qat.pt')!r}, weights_only=False)\n"
        "ref = granq_ao.convert_to_reference_fx(saved['model'])\n"
        "assert torch.equal(ref(saved['x']), saved['y'])\n"
        "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
