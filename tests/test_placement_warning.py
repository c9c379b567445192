"""act_placement="paper" is applied by granq_ao.prepare_qat_fx only; torch's prepare_qat_fx warns."""
import warnings

import pytest
import torch
from torch import nn
from torch.ao.quantization.quantize_fx import prepare_qat_fx as torch_prepare_qat_fx

import granq_ao
from conftest import prepare


def small_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten()).train()


EXAMPLE = (torch.randn(2, 3, 10, 10),)


def test_torch_prepare_warns_for_paper_placement():
    mapping = granq_ao.get_granq_qat_qconfig_mapping(4, 4, act_placement="paper")
    with pytest.warns(granq_ao.PlacementWarning, match="granq_ao.prepare_qat_fx"):
        model = torch_prepare_qat_fx(small_net(), mapping, EXAMPLE)
    # what the warning says: torch.ao's placement, more call sites than the paper's
    with warnings.catch_warnings():
        warnings.simplefilter("error", granq_ao.PlacementWarning)
        ours = granq_ao.prepare_qat_fx(small_net(), mapping, EXAMPLE)
    assert granq_ao.count_activation_fake_quant_calls(ours) == 1  # the ReLU output only
    assert granq_ao.count_activation_fake_quant_calls(model) > 1


def test_no_warning_for_all_placement_or_a_copy():
    import copy

    mapping = granq_ao.get_granq_qat_qconfig_mapping(4, 4, act_placement="all")
    paper = granq_ao.get_granq_qat_qconfig_mapping(4, 4, act_placement="paper")
    with warnings.catch_warnings():
        warnings.simplefilter("error", granq_ao.PlacementWarning)
        torch_prepare_qat_fx(small_net(), mapping, EXAMPLE)
        copied = copy.deepcopy(paper)  # a user's own copy is not a prepare
    assert copied.act_placement == "paper" and copied.scheme == paper.scheme


def test_paper_placement_on_a_model_without_relu_warns():
    """act_placement="paper" on a model with no ReLU left zero activation quantizers silently."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid(), nn.Conv2d(4, 4, 1))
    with pytest.warns(granq_ao.PlacementWarning, match="left 0 activation fake-quants.*ReLU.*has none.*"
                                                       r"act_placement='inputs' would quantize the 2 conv/linear"):
        qat = prepare(model, torch.randn(1, 3, 6, 6), act_placement="paper")
    assert granq_ao.count_activation_fake_quant_calls(qat) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", granq_ao.PlacementWarning)
        qat = prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), torch.randn(1, 3, 6, 6), act_placement="paper")
    assert granq_ao.count_activation_fake_quant_calls(qat) == 1


def test_nvidia_after_relu_placement_without_relu_warns():
    gq = pytest.importorskip("granq_ao.integrations.pytorch_quantization")
    from pytorch_quantization import nn as quant_nn

    model = nn.Sequential(quant_nn.QuantConv2d(3, 4, 3), nn.Sigmoid(), quant_nn.QuantConv2d(4, 4, 1))
    with pytest.warns(UserWarning, match="no quant module fed by a ReLU.*only_after_relu=False"):
        replaced = gq.replace_input_quantizers(model, gq.GranQDescriptor(num_bits=4), only_after_relu=True,
                                               example_inputs=torch.randn(1, 3, 6, 6))
    assert replaced == []
