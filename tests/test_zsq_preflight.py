"""zero_shot_qat refuses, before the student is trained (and for a BN-less teacher before it is
built), teachers without BatchNorm unless gamma=0, and placements that find no activation; with
gamma=0 a LayerNorm teacher trains."""
import pytest
import torch
from torch import nn

from granq_ao.zsq import ZSQConfig, zero_shot_qat
from granq_ao.zsq import student as student_module
from granq_ao.zsq.losses import batchnorm_statistics_loss, generator_loss

QUIET = dict(tensorboard=False, progress=False, log=lambda message: None, fused="eager")
TINY = dict(epochs=1, iters_per_epoch=2, batch_size=4, warmup_epochs=0, eval_batch_size=8, seed=0)


class LayerNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(1, 8)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.act(self.norm(self.conv(x))).mean(dim=(2, 3)))


class SiLUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardswish())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


def test_teacher_without_batchnorm_is_refused_before_the_student_is_built(monkeypatch):
    def no_student(*args, **kwargs):
        raise AssertionError("the student was built")

    monkeypatch.setattr("granq_ao.zsq.trainer.student_protocol", no_student)
    with pytest.raises(ValueError, match=r"has no BatchNorm layer.*gamma=0 \(--gamma 0\)") as error:
        zero_shot_qat(LayerNormNet().eval(), ZSQConfig(**TINY), num_classes=4, image_size=8, **QUIET)
    assert "\n" not in str(error.value)


def test_teacher_whose_batchnorms_keep_no_running_statistics_is_refused_up_front(monkeypatch):
    """BatchNorm with track_running_stats=False has nothing for the BN-statistics loss to match:
    refused like a teacher without BatchNorm, before the student is built, naming the flag."""
    def no_student(*args, **kwargs):
        raise AssertionError("the student was built")

    teacher = SiLUNet().eval()
    for index in (1, 4):
        teacher.body[index] = nn.BatchNorm2d(8, track_running_stats=False)
    monkeypatch.setattr("granq_ao.zsq.trainer.student_protocol", no_student)
    with pytest.raises(ValueError, match=r"no BatchNorm layer with running statistics.*track_running_stats=False"
                                         r".*gamma=0 \(--gamma 0\)") as error:
        zero_shot_qat(teacher, ZSQConfig(act_placement="inputs", **TINY), num_classes=4, image_size=8, **QUIET)
    assert "\n" not in str(error.value)


def test_gamma_zero_trains_a_layernorm_teacher():
    torch.manual_seed(0)
    student, results = zero_shot_qat(LayerNormNet().eval(), ZSQConfig(gamma=0.0, act_placement="paper", **TINY),
                                     num_classes=4, image_size=8, **QUIET)
    assert results["fake_quants"]["activation"] == 1
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_placement_that_finds_no_activation_is_refused_naming_the_one_that_works():
    with pytest.raises(ValueError, match=r"act_placement='paper' finds no activation to quantize in SiLUNet.*"
                                         r"act_placement='inputs'") as error:
        zero_shot_qat(SiLUNet().eval(), ZSQConfig(act_placement="paper", **TINY), num_classes=4, image_size=8, **QUIET)
    assert "\n" not in str(error.value)


def test_bns_term_is_zero_only_when_opted_out():
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    total, parts = generator_loss(logits, logits * 0.5, labels, [], gamma=0.0)
    assert float(parts["bns"]) == 0.0 and torch.isfinite(total)
    with pytest.raises(ValueError, match="no BatchNorm inputs were recorded"):
        generator_loss(logits, logits * 0.5, labels, [], gamma=1.0)
    with pytest.raises(ValueError):
        batchnorm_statistics_loss([])
