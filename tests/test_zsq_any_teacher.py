"""zero_shot_qat on teachers other than the CIFAR ResNet-20: a model written here (own image size,
classes and normalization, a Dataset for evaluation), pytorchcv preresnet20 and a torchvision
ResNet-18 at 64 px, each with real training steps."""
import json

import pytest
import torch
from torch import nn

from granq_ao.zsq import ZSQConfig, zero_shot_qat
from granq_ao.zsq.evaluation import wilson_interval

QUIET = dict(tensorboard=False, progress=False, log=lambda message: None, fused="eager")


class TinyNet(nn.Module):
    """A 5-class classifier of 16x16 images with two conv-BN-ReLU blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


def tiny_config(**changes):
    values = dict(epochs=2, iters_per_epoch=3, batch_size=4, warmup_epochs=1, eval_batch_size=16,
                  lr=1e-3, seed=1)
    values.update(changes)
    return ZSQConfig(**values)


def fake_dataset(n=24, size=16, classes=5):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, size, size, generator=generator)  # in [0, 1], like ToTensor()
    labels = torch.randint(0, classes, (n,), generator=generator)
    return torch.utils.data.TensorDataset(images, labels)


def test_model_written_here_with_a_dataset_and_normalization(tmp_path):
    torch.manual_seed(0)
    teacher = TinyNet().eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    data = fake_dataset()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    student, results = zero_shot_qat(teacher, tiny_config(act_placement="paper"), num_classes=5, image_size=16,
                                     normalize=(mean, std), eval_data=data, out_dir=tmp_path / "run", **QUIET)
    # the teacher is untouched, the student trained (its conv weights moved), it is GranQ-quantized
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert results["fake_quants"] == {"weight": 3, "activation": 2}  # 2 convs + linear; 2 ReLU outputs
    moved = [k for k, v in student.state_dict().items() if k.endswith("weight") and k in before
             and v.shape == before[k].shape and not torch.equal(v, before[k])]
    assert moved
    # the teacher's accuracy is the one computed here by hand, with the normalization applied
    images, labels = data.tensors
    normalized = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    correct = int((teacher(normalized).argmax(1) == labels).sum())
    assert results["n_test"] == 24 and results["correct"]["teacher"] == correct
    assert results["intervals"]["teacher"] == list(wilson_interval(correct, 24))
    assert results["epochs_completed"] == 2 and (tmp_path / "run" / "results.json").is_file()


def test_no_eval_data_and_no_out_dir():
    torch.manual_seed(0)
    student, results = zero_shot_qat(TinyNet().eval(), tiny_config(epochs=1, warmup_epochs=0), num_classes=5,
                                     image_size=16, **QUIET)
    assert results["final_acc"] is None and results["n_test"] is None and results["epochs_completed"] == 1
    assert not student.training
    assert torch.isfinite(student(torch.randn(2, 3, 16, 16))).all()


def test_pytorchcv_preresnet20():
    pytest.importorskip("pytorchcv")
    from pytorchcv.model_provider import get_model

    torch.manual_seed(0)
    teacher = get_model("preresnet20_cifar10", pretrained=False).eval()
    student, results = zero_shot_qat(teacher, tiny_config(epochs=1, warmup_epochs=0, iters_per_epoch=2),
                                     num_classes=10, image_size=32, eval_data=fake_dataset(8, 32, 10), **QUIET)
    assert results["fake_quants"]["activation"] > 0 and results["n_test"] == 8
    assert torch.isfinite(student(torch.randn(2, 3, 32, 32))).all()


def test_torchvision_resnet18_at_64_px():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    teacher = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    student, results = zero_shot_qat(teacher, tiny_config(epochs=1, warmup_epochs=0, iters_per_epoch=1, batch_size=2),
                                     num_classes=10, image_size=64, **QUIET)
    # torchvision's ResNet-18: 20 convs + fc carry weight fake-quants; paper placement: 17 ReLU outputs
    assert results["fake_quants"] == {"weight": 21, "activation": 17}
    assert student(torch.randn(3, 3, 64, 64)).shape == (3, 10)


def test_bad_arguments_are_refused_clearly():
    with pytest.raises(TypeError, match="teacher must be an nn.Module"):
        zero_shot_qat("resnet", tiny_config(), num_classes=5)
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        zero_shot_qat(TinyNet(), tiny_config(), num_classes=0)
    with pytest.raises(ValueError, match="act_bits must be an integer in"):
        zero_shot_qat(TinyNet(), tiny_config(act_bits=9), num_classes=5)
    with pytest.raises(ValueError, match="resume needs an out_dir"):
        zero_shot_qat(TinyNet(), tiny_config(), num_classes=5, image_size=16, resume=True, **QUIET)
    with pytest.raises(TypeError, match="evaluation data must be"):
        zero_shot_qat(TinyNet(), tiny_config(epochs=1), num_classes=5, image_size=16, eval_data=[1, 2], **QUIET)


def test_modelopt_student_trains_and_resumes(tmp_path):
    """ZSQConfig.toolchain="modelopt": the student is built by mtq.quantize with GranQ's backend;
    a run interrupted after one epoch and resumed ends as the uninterrupted one."""
    pytest.importorskip("modelopt")
    config = tiny_config(toolchain="modelopt", act_placement="paper", epochs=2, warmup_epochs=0, iters_per_epoch=2)
    data = fake_dataset()
    runs = {}
    for name in ("straight", "resumed"):
        torch.manual_seed(0)
        teacher = TinyNet().eval()
        options = dict(num_classes=5, image_size=16, eval_data=data, **QUIET)
        if name == "resumed":
            from granq_ao.zsq import ZSQTrainer

            assert ZSQTrainer(config, teacher, tmp_path / name, **options).run(stop_after_epochs=1) is None
            runs[name] = zero_shot_qat(teacher, config, out_dir=tmp_path / name, resume=True, **options)
        else:
            runs[name] = zero_shot_qat(teacher, config, out_dir=tmp_path / name, **options)
    (a, results), (b, resumed) = runs["straight"], runs["resumed"]
    # modelopt quantizes layer inputs: only the second conv takes a ReLU output (the head gets its mean)
    assert results["fake_quants"] == {"weight": 3, "activation": 1}
    assert results["config"]["toolchain"] == "modelopt" and resumed["final_acc"] == results["final_acc"]
    for key, value in a.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b.state_dict()[key]), key


@pytest.mark.numerics
def test_pt2e_student_trains_and_matches_the_fx_student(tmp_path):
    """ZSQConfig.toolchain="pt2e": the student is a (torchao) PT2E GranQ QAT graph. Its fake-quants sit
    where the torch.ao student's do, its accuracy before QAT is the torch.ao student's (the two
    QAT models are bit-equal in forward), and it trains (its weights move, losses stay finite)."""
    pytest.importorskip("torchao")
    data = fake_dataset()
    results = {}
    for toolchain in ("fx", "pt2e"):
        torch.manual_seed(0)
        config = tiny_config(toolchain=toolchain, act_placement="paper", epochs=1, warmup_epochs=0, iters_per_epoch=2)
        student, results[toolchain] = zero_shot_qat(TinyNet().eval(), config, num_classes=5, image_size=16,
                                                    eval_data=data, out_dir=tmp_path / toolchain, **QUIET)
        assert torch.isfinite(student(torch.randn(3, 3, 16, 16))).all()  # any batch size
    ao, pt2e = results["fx"], results["pt2e"]
    assert pt2e["fake_quants"] == ao["fake_quants"] == {"weight": 3, "activation": 2}
    assert pt2e["pre_qat_acc"] == ao["pre_qat_acc"]  # same student before training
    import json
    import math

    row = json.loads((tmp_path / "pt2e" / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(row["loss_s"]) and math.isfinite(row["loss_g"])
    before = torch.load(tmp_path / "pt2e" / "checkpoint.pt", weights_only=True)["student"]
    assert before.keys() and all(torch.isfinite(v).all() for v in before.values() if v.is_floating_point())
    # the pictures find the PT2E student's activation quantizers through its protocol, as the fx one's
    drawn = {name: json.loads((tmp_path / name / "activation_error.json").read_text()) for name in ("fx", "pt2e")}
    for stage in ("before_qat", "after_qat"):
        assert len(drawn["pt2e"][stage]["layers"]) == len(drawn["fx"][stage]["layers"]) == 2
    assert (tmp_path / "pt2e" / "activation_error.png").is_file()


@pytest.mark.parametrize("toolchain", ["fx", "pt2e", "modelopt"])
def test_warm_up_leaves_student_and_teacher_unchanged(toolchain):
    """A generator-only epoch must not change the student (frozen BN statistics, no student step)
    nor the teacher, whichever toolchain built the student: the accuracy after it equals the
    pre-QAT accuracy and every student parameter and BN statistic is unchanged (observers' running
    ranges for a static export may record; they never change an output)."""
    pytest.importorskip({"fx": "torch", "pt2e": "torchao", "modelopt": "modelopt"}[toolchain])
    from granq_ao.zsq import ZSQTrainer

    torch.manual_seed(0)
    teacher = TinyNet().eval()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = ZSQTrainer(tiny_config(toolchain=toolchain, act_placement="paper", epochs=1, warmup_epochs=1),
                         teacher, None, num_classes=5, image_size=16, eval_data=fake_dataset(), **QUIET)
    # (the PT2E eval-form graph still counts num_batches_tracked; it is read by nothing there)
    student_before = {k: v.clone() for k, v in trainer.student.state_dict().items()
                      if isinstance(v, torch.Tensor) and "activation_post_process" not in k
                      and not k.endswith("num_batches_tracked")}
    assert any("running_mean" in k for k in student_before)
    results = trainer.run()
    assert not teacher.training
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())
    after = trainer.student.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in student_before.items())
    assert results["final_acc"] == results["pre_qat_acc"]


def test_gdfq_generator_loss_runs_and_is_logged(tmp_path):
    torch.manual_seed(0)
    lines = []
    config = tiny_config(epochs=1, warmup_epochs=0, generator_loss="gdfq", gamma=0.1, student_loss="kl")
    student, results = zero_shot_qat(TinyNet().eval(), config, num_classes=5, image_size=16, out_dir=tmp_path / "run",
                                     log=lines.append, **{k: v for k, v in QUIET.items() if k != "log"})
    epoch_lines = [line for line in lines if line.startswith("epoch")]
    assert epoch_lines and "ce " in epoch_lines[-1] and "margin" not in epoch_lines[-1]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved.get("generator_loss", saved.get("config", {}).get("generator_loss")) == "gdfq"
    with pytest.raises(ValueError, match="generator_loss must be one of"):
        tiny_config(generator_loss="dfq").validate()
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0"):
        tiny_config(gamma=-1.0).validate()
