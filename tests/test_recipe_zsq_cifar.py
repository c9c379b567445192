"""recipes/zsq_cifar.py end to end on tiny configs: files, finite losses, resume equivalence,
2-process DDP, and CLI errors. Uses a small copy of the offline CIFAR-10 subset (64 images)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from granq_ao.zsq.data import load_cifar_test, shared_data_dir
from granq_ao.zsq.teachers import build_cifar_teacher
from granq_ao.zsq import ZSQConfig, ZSQTrainer, cli
from granq_ao.zsq.algorithm import ZSQAlgorithm

from conftest import import_script

REPO = Path(__file__).resolve().parents[1]
REAL = shared_data_dir()
pytestmark = pytest.mark.skipif(
    not (REAL / "cifar10" / "test_subset.npz").is_file() or not (REAL / "weights" / "resnet20_cifar10.pth").is_file(),
    reason="offline CIFAR data / teacher weights not available")

N_EVAL = 64
TINY = ["--epochs", "2", "--iters", "2", "--batch-size", "4", "--warmup-epochs", "1", "--eval-batch-size", "32",
        "--no-tensorboard"]


def load_recipe():
    return import_script("recipes/zsq_cifar.py", "zsq_cifar_recipe")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A GRANQ_DATA_DIR with the first 64 CIFAR-10 test images and links to the real teachers."""
    root = tmp_path_factory.mktemp("granq_data")
    (root / "cifar10").mkdir()
    with np.load(REAL / "cifar10" / "test_subset.npz") as arrays:
        np.savez(root / "cifar10" / "test_subset.npz", x=arrays["x"][:N_EVAL], y=arrays["y"][:N_EVAL])
    (root / "weights").mkdir()
    for name in ("resnet20_cifar10.pth", "resnet20_cifar100.pth"):
        (root / "weights" / name).symlink_to(REAL / "weights" / name)
    return root


@pytest.fixture
def env(data_dir, monkeypatch):
    monkeypatch.setenv("GRANQ_DATA_DIR", str(data_dir))
    monkeypatch.setenv("GRANQ_FUSED", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: threads only add overhead (and contention on shared CI)
    yield data_dir
    torch.set_num_threads(threads)


def test_tiny_run_writes_results_and_metrics(env, tmp_path, capsys):
    recipe = load_recipe()
    out = tmp_path / "run"
    assert recipe.main(TINY + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for label in ("teacher      :", "W4A4 pre-QAT :", "W4A4 final   :"):
        assert label in printed
    assert f"(n={N_EVAL})" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "RESUME.txt", "accuracy.png", "activation_error.json", "activation_error.png", "checkpoint.pt", "config.json",
        "generated_epoch001.png", "generated_epoch002.png", "metrics.jsonl", "results.json",
        "student_final.pt"]  # lock released; pictures (granq_ao.zsq.pictures) next to results.json
    results = json.loads((out / "results.json").read_text())
    for key in ("teacher_acc", "pre_qat_acc", "final_acc", "n_test", "config", "versions", "wall_time_s", "intervals"):
        assert key in results
    assert results["n_test"] == N_EVAL and results["epochs_completed"] == 2
    assert results["config"]["weight_bits"] == 4 and results["config"]["act_granularity"] == "granq"
    assert results["fake_quants"] == {"weight": 22, "activation": 19}
    for name in ("teacher", "pre_qat", "final"):
        low, high = results["intervals"][name]
        assert 0 <= low <= results[f"{name}_acc" if name != "pre_qat" else "pre_qat_acc"] <= high <= 1
    assert results["correct"]["teacher"] == round(results["teacher_acc"] * N_EVAL)
    paired = results["final_vs_pre_qat"]
    assert paired["fixed"] - paired["broken"] == results["correct"]["final"] - results["correct"]["pre_qat"]
    assert 0 < paired["mcnemar_exact_p"] <= 1
    assert "fixed" in printed and "McNemar" in printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and [r["phase"] for r in rows] == ["warmup", "qat"]
    for row in rows:
        for key in ("loss_g", "loss_s", "loss_g_bns", "loss_g_margin", "loss_g_ce_ds", "loss_g_ce_as"):
            assert np.isfinite(row[key]), key
    assert results["final_acc"] == rows[-1]["test_acc"]
    # after the QAT epoch the student's conv weights have moved away from the teacher's
    student = torch.load(out / "student_final.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in student.values() if v.is_floating_point())
    teacher, _ = build_cifar_teacher("cifar10", str(env / "weights" / "resnet20_cifar10.pth"),
                                     allow_download=False)
    shared = [k for k, v in teacher.state_dict().items()
              if k.endswith("conv.weight") and k in student and student[k].shape == v.shape]
    assert len(shared) == 21  # every conv of ResNet-20: init block, 18 in the 9 units, 2 shortcuts
    assert any(not torch.equal(student[k], teacher.state_dict()[k]) for k in shared)


def _state(trainer):
    return {**{f"g.{k}": v for k, v in trainer.generator.state_dict().items()},
            **{f"s.{k}": v for k, v in trainer.student.state_dict().items()}}


def test_resume_gives_the_same_result_as_an_uninterrupted_run(env, tmp_path):
    # no warm-up: the resumed epoch needs the student's SGD momentum from the checkpoint
    config = ZSQConfig(epochs=2, iters_per_epoch=2, batch_size=4, warmup_epochs=0, eval_batch_size=32, seed=3)
    teacher, _ = build_cifar_teacher("cifar10")
    task = dict(num_classes=10, image_size=32, eval_data=load_cifar_test("cifar10"))
    quiet = dict(tensorboard=False, progress=False, log=lambda message: None, **task)
    straight = ZSQTrainer(config, teacher, tmp_path / "a", **quiet)
    expected = straight.run()
    interrupted = ZSQTrainer(config, teacher, tmp_path / "b", **quiet)
    assert interrupted.run(stop_after_epochs=1) is None  # stops after epoch 1 (checkpointed)
    resumed = ZSQTrainer(config, teacher, tmp_path / "b", resume=True, **quiet)
    assert resumed.state["epoch"] == 1
    got = resumed.run()
    assert got["final_acc"] == expected["final_acc"] and got["pre_qat_acc"] == expected["pre_qat_acc"]
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (tmp_path / "a" / "metrics.jsonl").read_text().count("\n") == 2
    rows_a = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    for row_a, row_b in zip(rows_a, rows_b):
        assert row_a["loss_g"] == row_b["loss_g"] and row_a["loss_s"] == row_b["loss_s"]
        assert row_a["test_correct"] == row_b["test_correct"]
    # a finished run refuses to start over in the same folder
    with pytest.raises(FileExistsError, match="--resume"):
        ZSQTrainer(config, teacher, tmp_path / "a", **quiet)


def test_two_process_ddp_smoke(env, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               str(REPO / "recipes" / "zsq_cifar.py"), *TINY, "--out", str(out), "--device", "cpu"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["n_test"] == N_EVAL
    # only rank 0 prints the summary (once)
    assert done.stdout.count("W4A4 final   :") == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["loss_s"]) for r in rows)


def _cli_error(recipe, argv, capsys):
    with pytest.raises(SystemExit) as excinfo:
        recipe.main(argv)
    assert excinfo.value.code == 2
    return capsys.readouterr().err


def test_cli_errors(env, tmp_path, capsys):
    recipe = load_recipe()
    assert "bits must be an integer in [2, 8], got 9" in _cli_error(recipe, ["--wbits", "9"], capsys)
    assert "bits must be an integer in [2, 8], got 1" in _cli_error(recipe, ["--abits", "1"], capsys)
    assert "bits must be an integer in [2, 8], got 'four'" in _cli_error(recipe, ["--abits", "four"], capsys)
    assert "invalid choice" in _cli_error(recipe, ["--dataset", "mnist"], capsys)
    err = _cli_error(recipe, TINY + ["--dataset", "cifar10", "--out", str(tmp_path / "x"), "--teacher-weights",
                                     str(env / "weights" / "resnet20_cifar100.pth")], capsys)
    assert "100-class classifier" in err and "cifar100" in err
    err = _cli_error(recipe, TINY + ["--out", str(tmp_path / "y"), "--teacher-weights", str(tmp_path / "none.pth")],
                     capsys)
    assert "not found" in err
    # cifar100 evaluation images are absent from this data dir
    err = _cli_error(recipe, TINY + ["--dataset", "cifar100", "--out", str(tmp_path / "z")], capsys)
    assert "test_subset.npz" in err and "does not exist" in err
    err = _cli_error(recipe, TINY + ["--out", str(tmp_path / "w"), "--data-root", str(tmp_path / "cifar")], capsys)
    assert "torchvision's layout" in err and "--download" in err
    assert "--download needs --data-root" in _cli_error(recipe, ["--download"], capsys)
    assert "--resume needs --out" in _cli_error(recipe, ["--resume"], capsys)
    assert "no checkpoint" in _cli_error(recipe, ["--resume", "--out", str(tmp_path / "nothing")], capsys)


def test_ctrl_c_keeps_the_last_epoch_and_cli_resume(env, tmp_path, capsys, monkeypatch):
    recipe = load_recipe()
    out = tmp_path / "run"
    original = ZSQAlgorithm.train_step  # the epoch loop is the algorithm's (granq_ao.zsq.algorithm)
    calls = []

    def interrupt_in_epoch_two(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # epoch 1 = calls 1, 2; Ctrl-C during epoch 2
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ZSQAlgorithm, "train_step", interrupt_in_epoch_two)
    assert recipe.main(TINY + ["--out", str(out)]) == 130
    monkeypatch.setattr(ZSQAlgorithm, "train_step", original)
    err = capsys.readouterr().err
    assert "interrupted during epoch 2" in err and "--resume --out" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1 and not (out / "results.json").exists()
    err = _cli_error(recipe, ["--resume", "--out", str(out), "--wbits", "3"], capsys)
    assert "--weight-bits 3" in err and "differ" in err
    # the run's own settings come from the checkpoint; --epochs may grow to extend the run
    assert recipe.main(["--resume", "--out", str(out), "--epochs", "3", "--no-tensorboard"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["epochs_completed"] == 3 and results["config"]["batch_size"] == 4
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_presets():
    recipe = load_recipe()
    parser = recipe.build_parser()
    paper10 = recipe.preset_values(parser.parse_args(["--preset", "paper", "--dataset", "cifar10"]))
    paper100 = recipe.preset_values(parser.parse_args(["--preset", "paper", "--dataset", "cifar100"]))
    assert (paper10["epochs"], paper10["iters_per_epoch"], paper10["batch_size"]) == (200, 200, 16)
    assert paper100["batch_size"] == 200 and paper100["lr_milestones"] == (100,) and paper100["warmup_epochs"] == 4
    assert paper100["lr"] == 1e-4 and paper100["lr_generator"] == 1e-3
    args = parser.parse_args(["--preset", "paper", "--dataset", "cifar100", "--wbits", "3", "--abits", "3"])
    config = cli.resolve_config(args, parser, recipe.preset_values)
    assert (config.batch_size, config.weight_bits, config.act_bits, config.epochs) == (200, 3, 3, 200)
    args = parser.parse_args([])
    recipe.check_args(args, parser)
    config = cli.resolve_config(args, parser, recipe.preset_values).validate()
    assert (args.dataset, config.weight_bits, config.act_bits, config.act_granularity,
            config.weight_granularity, config.act_placement, config.toolchain) == (
        "cifar10", 4, 4, "granq", "channel", "paper", "fx")


def test_cli_refuses_bad_values_before_any_work(env, tmp_path, capsys):
    """Issue 11: these failed with tracebacks after seconds of setup; now exit 2 with one line."""
    recipe = load_recipe()
    assert "expected an integer >= 0" in _cli_error(recipe, TINY + ["--seed", "-1"], capsys)
    for value in ("inf", "nan", "0"):
        assert "expected a finite number > 0" in _cli_error(recipe, TINY + ["--lr", value], capsys)
    assert "expected a finite number > 0" in _cli_error(recipe, TINY + ["--lr=-1e-3"], capsys)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert "is a file, not a folder" in _cli_error(recipe, TINY + ["--out", str(a_file)], capsys)
    assert "cannot create the folder" in _cli_error(recipe, TINY + ["--out", str(a_file / "run")], capsys)


def test_output_folder_lock(env, tmp_path, capsys):
    """A second run with the same --out stops at once while the first holds the folder; a lock left
    by a dead process is taken over."""
    recipe = load_recipe()
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(str(holder.pid))
        err = _cli_error(recipe, TINY + ["--out", str(out)], capsys)
        assert f"in use by another run (pid {holder.pid})" in err
    finally:
        holder.kill()
        holder.wait()
    assert recipe.main(TINY + ["--epochs", "1", "--out", str(out)]) == 0  # stale lock: taken over
    assert not (out / ".lock").exists()  # released at the end


def test_resume_refuses_damaged_checkpoints_and_fewer_epochs(env, tmp_path, capsys):
    recipe = load_recipe()
    out = tmp_path / "run"
    assert recipe.main(TINY + ["--out", str(out)]) == 0
    before = (out / "results.json").read_text()
    err = _cli_error(recipe, ["--resume", "--out", str(out), "--epochs", "1"], capsys)
    assert "already completed 2 epochs" in err and "--epochs must be >= 2" in err
    assert (out / "results.json").read_text() == before  # nothing rewritten
    checkpoint = out / "checkpoint.pt"
    data = checkpoint.read_bytes()
    for damaged in (data[: len(data) // 2], b""):
        checkpoint.write_bytes(damaged)
        err = _cli_error(recipe, ["--resume", "--out", str(out)], capsys)
        assert "is damaged and cannot be read" in err and "no older one is kept" in err


def test_paper_preset_on_a_cpu_says_how_many_iterations_it_is(env, tmp_path, capsys, monkeypatch):
    recipe = load_recipe()

    def stop_at_once(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ZSQAlgorithm, "train_step", stop_at_once)
    # the preset's schedule, with a small batch so the (interrupted) start stays cheap
    assert recipe.main(["--preset", "paper", "--batch-size", "2", "--eval-batch-size", "512", "--fused", "eager",
                        "--no-tensorboard", "--no-pictures", "--out", str(tmp_path / "paper")]) == 130
    out = capsys.readouterr().out
    assert "--preset paper on a CPU is 40,000 iterations at batch 2" in out
