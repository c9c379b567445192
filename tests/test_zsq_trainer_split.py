"""The trainer in two pieces: the algorithm (ZSQAlgorithm) and the run record (RunRecord).

Resumes stay bit-identical (a run split as 1 epoch + resume + 1 epoch ends with the same weights,
optimizer state, losses and predictions as the straight run: both sides in this one process, so
on the same kernels), the pieces work on their own, and benchmarks/profile_iteration.py times
the real iteration."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from granq_ao.zsq import RunOptions, ZSQConfig, ZSQTrainer
from granq_ao.zsq.algorithm import PHASES, ZSQAlgorithm
from granq_ao.zsq.run_record import RunRecord

REPO = Path(__file__).resolve().parents[1]
QUIET = dict(tensorboard=False, progress=False, log=lambda message: None, fused="eager")


class SmallNet(nn.Module):
    """A 4-class classifier of 16x16 images: conv-BN-ReLU twice, mean pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


def images_and_labels(n=12):
    stream = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(n, 3, 16, 16, generator=stream),
                                          torch.randint(0, 4, (n,), generator=stream))


def trainer(out_dir, resume=False, **changes):
    torch.manual_seed(0)
    config = ZSQConfig(**{**dict(epochs=2, iters_per_epoch=1, batch_size=4, warmup_epochs=0, eval_batch_size=8,
                                 lr=1e-2, seed=4), **changes})
    return ZSQTrainer(config, SmallNet().eval(), out_dir, num_classes=4, image_size=16, eval_data=images_and_labels(),
                      resume=resume, **QUIET)


def everything(run):
    """Weights, optimizer states and per-image predictions of a finished run."""
    algorithm = run.algorithm.state_dict()
    tensors = {f"{part}.{key}": value for part in ("generator", "student")
               for key, value in algorithm[part].items() if isinstance(value, torch.Tensor)}
    for part in ("optimizer_g", "optimizer_s"):
        for index, slot in algorithm[part]["state"].items():
            tensors.update({f"{part}.{index}.{key}": value for key, value in slot.items()})
    tensors["predictions"] = torch.cat([run.student(x).argmax(1) for x, _ in
                                        torch.utils.data.DataLoader(images_and_labels(), batch_size=8)])
    return tensors


def test_a_resumed_run_ends_bit_identical_to_the_straight_run(tmp_path):
    straight = trainer(tmp_path / "straight")
    expected = straight.run()
    first = trainer(tmp_path / "split")
    assert first.run(stop_after_epochs=1) is None and first.state["epoch"] == 1
    second = trainer(tmp_path / "split", resume=True)
    assert second.state["epoch"] == 1
    got = second.run()
    a, b = everything(straight), everything(second)
    assert a.keys() == b.keys() and len(a) > 20
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert got["final_acc"] == expected["final_acc"] and got["correct"] == expected["correct"]
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("straight", "split")}
    for row_a, row_b in zip(rows["straight"], rows["split"]):
        assert {k: v for k, v in row_a.items() if "time" not in k and "per_iter" not in k and k != "eta_s"} == \
               {k: v for k, v in row_b.items() if "time" not in k and "per_iter" not in k and k != "eta_s"}
    errors = {name: json.loads((tmp_path / name / "activation_error.json").read_text()) for name in rows}
    assert errors["straight"] == errors["split"] and len(errors["straight"]["after_qat"]["layers"]) == 2
    # a resumed run is a different computation: the check above can fail (a third epoch changes the weights)
    third = trainer(tmp_path / "split", resume=True, epochs=3)
    third.run()
    assert not all(torch.equal(a[key], value) for key, value in everything(third).items())


def test_the_algorithm_trains_without_a_record_and_the_record_without_an_algorithm(tmp_path):
    torch.manual_seed(0)
    run = trainer(None)
    algorithm = ZSQAlgorithm(run.config, run.teacher, run.student, run.protocol, run.generator, run.ctx,
                             RunOptions(progress=False))
    before = {k: v.clone() for k, v in run.student.state_dict().items()}
    stats = algorithm.train_epoch(0)
    assert stats.epoch == 0 and not stats.warmup and set(stats.means) >= {"loss_g", "loss_s"}
    assert any(not torch.equal(before[k], v) for k, v in run.student.state_dict().items())
    record = RunRecord(run.config, {"teacher": "SmallNet", "eval": None}, tmp_path / "run", run.ctx,
                       RunOptions(tensorboard=False, log=lambda message: None))
    record.start("cpu")
    record.end_epoch({"epoch": 1, "loss_g": 1.0}, None, True, algorithm.state_dict)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["last"] is None and saved["history"] == [{"epoch": 1, "loss_g": 1.0}]
    assert all(torch.equal(saved["student"][k], v) for k, v in run.student.state_dict().items())
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text()) == {"epoch": 1, "loss_g": 1.0}
    with pytest.raises(FileExistsError, match="already holds a run"):
        RunRecord(run.config, {}, tmp_path / "run", run.ctx)
    with pytest.raises(ValueError, match="different configuration: lr"):
        RunRecord(ZSQConfig(**{**run.config.to_dict(), "lr": 0.5}), {"teacher": "SmallNet", "eval": None},
                  tmp_path / "run", run.ctx, resume=True)


def test_options_are_one_dataclass_and_unknown_ones_are_refused():
    run = trainer(None, epochs=1)
    assert isinstance(run.options, RunOptions) and run.options.fused == "eager" and run.options.eval_every == 1
    with pytest.raises(TypeError, match="unexpected keyword argument 'tensorbord'"):
        ZSQTrainer(run.config, SmallNet(), None, num_classes=4, image_size=16, tensorbord=False)
    with pytest.raises(ValueError, match="eval_every must be a positive integer"):
        RunOptions(eval_every=0)


def test_profile_iteration_times_the_real_iteration():
    """The benchmark's phases are the algorithm's own train_step (a twin trainer stepped by
    train_step ends with the same weights), with one timer per step."""
    spec = importlib.util.spec_from_file_location("profile_iteration", REPO / "benchmarks" / "profile_iteration.py")
    profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile)
    timed, twin = trainer(None), trainer(None)
    for run in (timed, twin):
        run.algorithm.start_epoch(0)
    phases = profile.timed_phases(timed, torch.Generator().manual_seed(1))
    twin.train_step(torch.Generator().manual_seed(1), train_student=True)
    assert set(phases) == set(PHASES) | {"cpu_s"} and all(phases[name] >= 0 for name in PHASES)
    for key, value in twin.student.state_dict().items():
        assert torch.equal(timed.student.state_dict()[key], value), key
    for key, value in twin.generator.state_dict().items():
        assert torch.equal(timed.generator.state_dict()[key], value), key


def test_profile_iteration_builds_the_recipes_trainer_for_any_teacher(load_script):
    """``--arch``: the teacher of that architecture and, for a teacher on raw pixels (ResNet-8),
    a generator whose outputs are mapped into that space, as the recipe builds it."""
    from granq_ao.zsq.data import generator_output_statistics, shared_data_dir
    from granq_ao.zsq.teachers import CIFAR_TEACHERS, cifar_teacher

    if not (shared_data_dir() / "weights" / CIFAR_TEACHERS["resnet8_tiny"].files["cifar10"]).is_file():
        pytest.skip("offline teacher not available")
    profile = load_script("benchmarks/profile_iteration.py")
    run = profile.build_trainer("cifar10", 4, 2, "granq", False, 0, None, arch="resnet8_tiny")
    mean, std = generator_output_statistics("cifar10", cifar_teacher("resnet8_tiny").normalization("cifar10"))
    assert type(run.teacher).__name__ == type(CIFAR_TEACHERS["resnet8_tiny"].build(10)).__name__
    assert torch.allclose(run.generator.output_mean.flatten(), torch.as_tensor(mean, dtype=torch.float32))
    assert torch.allclose(run.generator.output_std.flatten(), torch.as_tensor(std, dtype=torch.float32))
    run.algorithm.start_epoch(0)
    phases = profile.timed_phases(run, torch.Generator().manual_seed(1))
    assert all(phases[name] >= 0 for name in PHASES)
