"""Tracing freezes ``self.training``: functional dropout / batch norm read the live flag after
granq_ao.prepare_qat_fx; other train/eval branches are refused; PT2E students evaluate deterministically."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization.quantize_fx import prepare_qat_fx as torch_prepare_qat_fx

import granq_ao
from granq_ao.config import GranQScheme
from granq_ao.integrations.torch_ao.training_flag import check_training_branches, make_training_flags_live

SCHEME = GranQScheme.from_kwargs(4, 4, fused="eager")
EXAMPLE = (torch.randn(4, 3, 8, 8),)


@pytest.fixture(autouse=True)
def _eager_math(monkeypatch):
    monkeypatch.setenv("GRANQ_FUSED", "eager")


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d idea: F.batch_norm with a flag computed from self.training."""

    def forward(self, x):
        return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                   self.training, 0.1, self.eps))


class DropHead(nn.Module):
    """timm's classifier idea: ``F.dropout(x, p, training=self.training)`` in a traced forward."""

    def __init__(self, p=0.5):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = BatchNormAct(8)
        self.fc = nn.Linear(8, 5)
        self.p = p

    def forward(self, x):
        x = self.bn(self.conv(x)).mean((2, 3))
        x = F.dropout(x, p=self.p, training=self.training)
        return self.fc(x)


def prepare(model, mapping=None):
    return granq_ao.prepare_qat_fx(model, mapping or granq_ao.get_granq_qat_qconfig_mapping(SCHEME), EXAMPLE)


def test_torch_prepare_freezes_the_flag():
    """The symptom this fixes: torch.ao's prepare traced in train mode keeps dropping in eval."""
    torch.manual_seed(0)
    model = torch_prepare_qat_fx(DropHead().train(), granq_ao.get_granq_qat_qconfig_mapping(SCHEME), EXAMPLE).eval()
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


def test_fx_eval_is_deterministic_and_equals_eval_traced():
    torch.manual_seed(0)
    teacher = DropHead()
    with torch.no_grad():
        teacher.bn.running_mean.uniform_(-1, 1)
        teacher.bn.running_var.uniform_(0.5, 2)
    from_train = prepare(copy.deepcopy(teacher).train()).eval()
    from_eval = prepare(copy.deepcopy(teacher).eval()).eval()
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        first = from_train(x)
        assert torch.equal(first, from_train(x))
        assert torch.equal(first, from_eval(x))
        assert torch.equal(first[:2], from_train(x[:2]))  # running statistics: no batch dependence
    from_train.train()
    torch.manual_seed(1)
    a = from_train(x)
    torch.manual_seed(2)
    assert not torch.equal(a, from_train(x))  # train mode still drops
    # and the eval-traced model drops in train mode too: the flag is live both ways
    from_eval.train()
    torch.manual_seed(1)
    assert torch.equal(from_eval(x), a)


def test_batch_norm_reads_its_owner_flag():
    model = prepare(DropHead(p=0.0).train())
    nodes = [node for node in model.graph.nodes if node.op == "call_function" and node.target is F.batch_norm]
    assert len(nodes) == 1
    flag = nodes[0].kwargs["training"]  # FX records F.batch_norm's flag as a keyword
    assert flag.op == "get_attr" and flag.target == "bn.training"
    dropout = next(node for node in model.graph.nodes if node.target is F.dropout)
    assert dropout.kwargs["training"].target == "training"
    assert make_training_flags_live(model) == []  # nothing left constant


class TrainingBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        x = self.conv(x)
        if self.training:
            x = x * 2
        return x


def test_other_training_branches_are_refused():
    model = TrainingBranch().train()
    with pytest.raises(ValueError, match=r"TrainingBranch's forward takes a different path in train and eval mode "
                                         r"\(operation 1: <built-in function mul> in train mode"):
        prepare(model)
    assert model.training and model.conv.training  # flags restored
    check_training_branches(DropHead())  # the live-able calls pass


def test_pt2e_student_evaluates_deterministically():
    pytest.importorskip("torchao")
    from granq_ao.zsq.student import build_student

    torch.manual_seed(0)
    teacher = DropHead()
    student = build_student("pt2e", teacher, SCHEME, EXAMPLE)
    no_dropout = copy.deepcopy(teacher)
    no_dropout.p = 0.0
    reference = build_student("pt2e", no_dropout, SCHEME, EXAMPLE)
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        first = student(x)
        assert torch.equal(first, student(x))
        assert torch.equal(first, reference(x))


def test_fx_student_evaluates_deterministically():
    from granq_ao.zsq.student import build_student

    torch.manual_seed(0)
    teacher = DropHead()
    student = build_student("fx", teacher, SCHEME, EXAMPLE)
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(student(x), student(x))


class StochasticDepthNet(nn.Module):
    """torchvision's StochasticDepth (an fx-wrapped function taking self.training) on a branch."""

    def __init__(self, p=0.5):
        super().__init__()
        from torchvision.ops import StochasticDepth

        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.drop = StochasticDepth(p, "row")
        self.fc = nn.Linear(3, 5)

    def forward(self, x):
        return self.fc((x + self.drop(self.conv(x))).mean((2, 3)))


def test_fx_stochastic_depth_flag_is_live():
    torch.manual_seed(0)
    teacher = StochasticDepthNet()
    model = prepare(copy.deepcopy(teacher).train())
    node = next(node for node in model.graph.nodes if "stochastic_depth" in str(node.target))
    flag = node.args[3] if len(node.args) > 3 else node.kwargs["training"]
    assert isinstance(flag, torch.fx.Node) and flag.target == "training"
    model.eval()
    from_eval = prepare(copy.deepcopy(teacher).eval()).eval()
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        assert torch.equal(model(x), from_eval(x))


def test_pt2e_student_refuses_a_random_eval_form():
    pytest.importorskip("torchao")
    from granq_ao.zsq.student import build_student

    with pytest.raises(ValueError, match=r"still draws random numbers in eval form \(aten\.bernoulli.*"
                                         r"stochastic_depth_prob"):
        build_student("pt2e", StochasticDepthNet(), SCHEME, EXAMPLE)
    student = build_student("pt2e", StochasticDepthNet(p=0.0), SCHEME, EXAMPLE)  # nothing random left
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(student(x), student(x))
