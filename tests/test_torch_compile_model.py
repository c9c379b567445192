"""A GranQ-prepared QAT model under the user's own ``torch.compile``: one graph (no graph break
from the NaN/inf check), the same numbers as eager, and NaN input still refused."""
import pytest
import torch
import torch._dynamo
from torch import nn

import granq_ao
from granq_ao import functional as F


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture()
def qat_model():
    torch.manual_seed(0)
    example = (torch.randn(4, 3, 8, 8),)
    mapping = granq_ao.get_granq_qat_qconfig_mapping(4, 4, act_placement="paper")
    model = granq_ao.prepare_qat_fx(SmallNet().train(), mapping, example)
    model(*example)  # first batch: observers sized
    torch._dynamo.reset()
    yield model
    torch._dynamo.reset()


def test_whole_model_compiles_to_one_graph(qat_model):
    explanation = torch._dynamo.explain(qat_model)(torch.randn(4, 3, 8, 8))
    assert explanation.graph_break_count == 0, [str(r.reason)[:120] for r in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.numerics
def test_compiled_model_matches_eager(qat_model):
    x = torch.randn(4, 3, 8, 8)
    qat_model.eval()
    compiled = torch.compile(qat_model, backend="aot_eager")
    assert torch.equal(compiled(x), qat_model(x))


def test_nan_input_refused_inside_compiled_model(qat_model):
    compiled = torch.compile(qat_model.eval(), backend="aot_eager")
    x = torch.randn(4, 3, 8, 8)
    x[1, 0, 2, 2] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or infinite"):
        compiled(x)
    with pytest.raises(F.NonFiniteInputError, match="NaN or infinite"):  # eager: the library's error
        qat_model(x)
