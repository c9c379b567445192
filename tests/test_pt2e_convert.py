"""PT2E parity with torchao's own quantizers (issue 20, item 3), checked as torchao's
test_quantize_pt2e_qat.py checks its own: convert_pt2e folds conv-BN (no batch norm node left,
in 1d/2d/3d, with and without conv bias, also from the training form) when asked
(``GranQQuantizer(fold_bn=True)``), and transposed convolutions are quantized with
per-output-channel weight ranges (groups included), as the ``quantize_`` path does.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

from granq_ao import GranQScheme
from granq_ao import functional as F
from granq_ao.integrations.torchao import (GranQPT2EFakeQuantize, GranQQuantizer, export_for_qat,
                                           granq_fake_quant_calls, move_exported_model_to_eval,
                                           move_exported_model_to_train)

_aten = torch.ops.aten
BATCH_NORMS = {_aten.batch_norm.default, _aten._native_batch_norm_legit.default,
               _aten._native_batch_norm_legit_no_training.default}
CONVS = {1: (nn.Conv1d, nn.BatchNorm1d, (4, 3, 10)), 2: (nn.Conv2d, nn.BatchNorm2d, (4, 3, 8, 8)),
         3: (nn.Conv3d, nn.BatchNorm3d, (4, 3, 4, 4, 4))}


def count(graph_module, targets) -> int:
    return sum(1 for n in graph_module.graph.nodes if n.op == "call_function" and n.target in targets)


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("conv_bias", [False, True])
def test_convert_folds_conv_bn(dim, conv_bias):
    conv, bn, shape = CONVS[dim]
    torch.manual_seed(0)
    model = nn.Sequential(conv(3, 6, 3, bias=conv_bias), bn(6, eps=1e-3), conv(6, 4, 1), bn(4), nn.ReLU()).eval()
    x = torch.randn(*shape)
    # paper placement, 8-bit: the only activation quantizer sits after the last ReLU, so folding
    # changes numbers by float rounding only
    prepared = prepare_qat_pt2e(export_for_qat(model, (x,)),
                                GranQQuantizer(weight_bits=4, act_bits=8, act_placement="paper", fold_bn=True))
    move_exported_model_to_train(prepared)
    prepared(x)  # running statistics move
    assert count(prepared, BATCH_NORMS) == 2
    move_exported_model_to_eval(prepared)
    with torch.no_grad():
        expected = prepared(x)
        converted = convert_pt2e(copy.deepcopy(prepared))
        assert count(converted, BATCH_NORMS) == 0
        torch.testing.assert_close(converted(x), expected, rtol=0, atol=1e-5)
    # without the option, QAT's arithmetic stays, bit for bit
    with torch.no_grad():
        unfolded = convert_pt2e(copy.deepcopy(prepared))
    prepared_default = copy.deepcopy(prepared)
    for module in prepared_default.modules():
        if isinstance(module, GranQPT2EFakeQuantize):
            module.fold_bn = False
    with torch.no_grad():
        unfolded = convert_pt2e(prepared_default)
        assert count(unfolded, BATCH_NORMS) == 2
        assert torch.equal(unfolded(x), expected)


def test_conv3d_bn_is_not_fused_by_torchao_and_stays():
    """torchao's conv-bn QAT fusion covers conv1d/conv2d (and transposed) only: a conv3d's BN runs on
    its output in QAT, with the weight quantized unscaled, so folding would change the weight grid;
    it stays, and convert equals QAT eval."""
    conv, bn, shape = CONVS[3]
    torch.manual_seed(0)
    model = nn.Sequential(conv(3, 6, 3), bn(6), nn.ReLU()).eval()
    x = torch.randn(*shape)
    prepared = prepare_qat_pt2e(export_for_qat(model, (x,)), GranQQuantizer(weight_bits=4, act_bits=4, fold_bn=True))
    move_exported_model_to_eval(prepared)
    with torch.no_grad():
        expected = prepared(x)
        converted = convert_pt2e(copy.deepcopy(prepared))
        assert count(converted, BATCH_NORMS) == 1
        assert torch.equal(converted(x), expected)


def test_fold_bn_erases_bn_node_even_in_training_form():
    """torchao's test_fold_bn_erases_bn_node: converted straight after prepare (training form)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 3, bias=False), nn.BatchNorm2d(3))
    x = torch.randn(2, 3, 5, 5)
    prepared = prepare_qat_pt2e(export_for_qat(model, (x,)), GranQQuantizer(fold_bn=True))
    converted = convert_pt2e(prepared)
    assert count(converted, BATCH_NORMS) == 0
    assert count(converted, {_aten.conv2d.default}) == 1


def transposed_reference(weight: torch.Tensor, groups: int, bits: int) -> torch.Tensor:
    """Per-output-channel fake-quant of a transposed conv weight (in, out/groups, *k), by a loop
    over (group, output channel): output channel g * out/groups + j is weight[g-th in block, j]."""
    in_channels, out_per_group = weight.shape[:2]
    in_per_group = in_channels // groups
    result = torch.empty_like(weight)
    for g in range(groups):
        for j in range(out_per_group):
            block = weight[g * in_per_group:(g + 1) * in_per_group, j]
            result[g * in_per_group:(g + 1) * in_per_group, j] = F.fake_quantize(block.reshape(1, -1), bits, "tensor").reshape(block.shape)
    return result


@pytest.mark.parametrize("placement", ["all", "paper"])
def test_transposed_conv_weights_per_output_channel(placement):
    torch.manual_seed(0)
    # (torchao's transposed-conv-bn QAT fusion does not handle groups: the grouped one has no BN)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2), nn.ReLU(),
                          nn.ConvTranspose2d(6, 4, 1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = torch.randn(4, 3, 8, 8)
    prepared = prepare_qat_pt2e(export_for_qat(model, (x,)),
                                GranQQuantizer(GranQScheme.from_kwargs(3, 4, act_placement=placement)))
    calls = granq_fake_quant_calls(prepared)
    assert len(calls["weight"]) == 3  # the conv and the two transposed convs
    assert len(calls["activation"]) == {"all": 4, "paper": 3}[placement]
    transposed = [m for m in prepared.modules() if isinstance(m, GranQPT2EFakeQuantize) and m.transposed_groups]
    assert sorted(m.transposed_groups for m in transposed) == [1, 2]
    transposed = [m for m in transposed if m.transposed_groups == 2]
    weight = torch.randn(8, 3, 2, 2)
    assert torch.equal(transposed[0](weight), transposed_reference(weight, 2, 3))
    move_exported_model_to_eval(prepared)
    with torch.no_grad():
        expected = prepared(x)
        converted = convert_pt2e(copy.deepcopy(prepared))
        assert torch.equal(converted(x), expected)
        assert torch.equal(converted(torch.cat([x, x])), torch.cat([expected, expected]))
