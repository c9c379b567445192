"""act_placement="paper" is applied by granq_ao.prepare_qat_fx only; torch's prepare_qat_fx warns."""
import warnings

import pytest
import torch
from torch import nn
from torch.ao.quantization.quantize_fx import prepare_qat_fx as torch_prepare_qat_fx

import granq_ao


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
