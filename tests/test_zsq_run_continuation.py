"""Continuing a run: the resume command printed and written into the run folder, the machines a
run went through (another CPU model is said, not refused), and an ETA that counts what is left."""
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from granq_ao.zsq import RunOptions, ZSQConfig, ZSQTrainer
from granq_ao.zsq.distributed import DistributedContext
from granq_ao.zsq import run_record
from granq_ao.zsq.run_record import eta_seconds, eta_text


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


def test_eta_counts_each_remaining_epoch_by_its_phase_and_the_evaluations_left():
    config = ZSQConfig(epochs=10, iters_per_epoch=100, warmup_epochs=2)
    history = [{"epoch": 1, "phase": "warmup", "s_per_iter": 0.2, "eval_time_s": None},
               {"epoch": 2, "phase": "warmup", "s_per_iter": 0.4, "eval_time_s": 7.0},
               {"epoch": 3, "phase": "qat", "s_per_iter": 1.0, "eval_time_s": None}]
    # 7 QAT epochs left at 1.0 s/iter, 2 s of files each; evaluations after epochs 4, 6, 8, 10 at 7 s
    assert eta_seconds(history, config, eval_every=2, overhead_s=2.0) == pytest.approx(7 * 100 + 7 * 2 + 4 * 7)
    # during the warm-up the QAT rate is not known yet: the warm-up's stands in for it
    assert eta_seconds(history[:1], config, eval_every=1) == pytest.approx(9 * 100 * 0.2)
    assert math.isnan(eta_seconds([], config, eval_every=1))
    # ... and the log says that this is a lower bound until a QAT epoch has been timed
    assert eta_text(history[:1], config, eval_every=1) == ">03:00 (QAT rate not measured yet)"
    assert eta_text(history, config, eval_every=2, overhead_s=2.0) == "12:22"
    assert eta_text(history[:2], ZSQConfig(epochs=2, iters_per_epoch=100, warmup_epochs=2), eval_every=1) == "00:00"


def test_a_run_continued_on_another_cpu_says_so_and_records_both(tmp_path, monkeypatch):
    config = ZSQConfig(epochs=2, iters_per_epoch=2, batch_size=4, warmup_epochs=0, eval_batch_size=8, seed=0)
    torch.manual_seed(0)
    teacher = TinyNet().eval()
    quiet = dict(num_classes=3, image_size=8, tensorboard=False, progress=False, fused="eager", pictures=False)
    first = ZSQTrainer(config, teacher, tmp_path / "run", log=lambda m: None, **quiet)
    assert first.run(stop_after_epochs=1) is None
    other = dict(run_record.kernel_signature(), cpu="Another CPU (R) 9000")
    monkeypatch.setattr(run_record, "kernel_signature", lambda: other)
    lines = []
    resumed = ZSQTrainer(config, teacher, tmp_path / "run", resume=True, log=lines.append, **quiet)
    results = resumed.run()
    notes = [line for line in lines if "on other kernels" in line]
    assert len(notes) == 1 and "Another CPU (R) 9000" in notes[0] and "not bit-identical" in notes[0]
    assert [m["from_epoch"] for m in results["machines"]] == [0, 1]
    # every start is a session (dated), whether or not the kernels changed
    assert [session["from_epoch"] for session in results["sessions"]] == [0, 1]
    assert results["sessions"][1]["cpu"] == "Another CPU (R) 9000"
    assert results["machines"][1]["kernels"]["cpu"] == "Another CPU (R) 9000"
    # the same machine again adds nothing; nor does a record written before "threads" was recorded
    record = run_record.RunRecord(config, {}, None, resumed.ctx)
    record.state["machines"] = [{"from_epoch": 0, "kernels": other}]
    record.note_machine()
    assert len(record.state["machines"]) == 1
    record.state["machines"] = [{"from_epoch": 0, "kernels": {k: v for k, v in other.items() if k != "threads"}}]
    record.note_machine()
    assert len(record.state["machines"]) == 1


def test_another_thread_count_is_another_kernel_signature(tmp_path, monkeypatch):
    """CPU kernels split sums by thread: a continuation with another thread count is noted."""
    config = ZSQConfig(epochs=2, iters_per_epoch=2, batch_size=4, warmup_epochs=0, eval_batch_size=8, seed=0)
    before = torch.get_num_threads()
    lines = []
    record = run_record.RunRecord(config, {}, None, DistributedContext(), RunOptions(log=lines.append))
    try:
        torch.set_num_threads(1)
        record.note_machine()
        torch.set_num_threads(2)
        record.note_machine()
    finally:
        torch.set_num_threads(before)
    assert [m["kernels"]["threads"] for m in record.state["machines"]] == ["1", "2"]
    assert len(lines) == 1 and "threads '1' -> '2'" in lines[0]


def test_the_recipe_prints_and_writes_the_command_that_continues_it(tmp_path, capsys, load_script, monkeypatch):
    from granq_ao.zsq.data import shared_data_dir

    if not (shared_data_dir() / "weights" / "resnet20_cifar10.pth").is_file():
        pytest.skip("offline teacher not available")
    monkeypatch.setenv("GRANQ_FUSED", "eager")
    recipe = load_script("recipes/zsq_cifar.py")
    out = tmp_path / "run"
    args = ["--epochs", "1", "--iters", "1", "--batch-size", "4", "--warmup-epochs", "0", "--eval-batch-size", "512",
            "--no-tensorboard", "--no-pictures", "--out", str(out)]
    assert recipe.main(args) == 0
    printed = capsys.readouterr().out
    line = next(l for l in printed.splitlines() if l.startswith("resume   :"))
    note = (out / "RESUME.txt").read_text()
    command = f"recipes/zsq_cifar.py --resume --out {out.resolve()}"
    assert command in line and command in note and "bit-identical" in note
    threads = f"OMP_NUM_THREADS={torch.get_num_threads()} "  # resumed with the run's thread count
    assert f"resume   : {threads}" in line and f"    {threads}" in note
    assert note.count("--resume") == 1


def test_one_slow_epoch_barely_moves_the_eta():
    """The rate is the median of the phase's last 5 epochs: an epoch slowed by other work on the
    machine (here 3x) does not triple what is left; the evaluation time is a median too."""
    config = ZSQConfig(epochs=10, iters_per_epoch=100, warmup_epochs=0)
    history = [{"epoch": e, "phase": "qat", "s_per_iter": rate, "eval_time_s": evaluation}
               for e, (rate, evaluation) in enumerate([(1.0, 5.0), (1.0, 5.0), (3.0, 30.0), (1.0, 5.0), (1.0, None)], 1)]
    assert eta_seconds(history, config, eval_every=1) == pytest.approx(5 * 100 * 1.0 + 5 * 5.0)


def test_a_resumed_run_keeps_its_saved_run_options_and_says_when_they_change(tmp_path):
    config = ZSQConfig(epochs=3, iters_per_epoch=1, batch_size=4, warmup_epochs=0, eval_batch_size=8, seed=0)
    torch.manual_seed(0)
    teacher = TinyNet().eval()
    quiet = dict(num_classes=3, image_size=8, tensorboard=False, progress=False, fused="eager", pictures=False)
    first = ZSQTrainer(config, teacher, tmp_path / "run", eval_every=2, log=lambda m: None, **quiet)
    assert first.run(stop_after_epochs=1) is None
    # each metrics row says when its epoch was done and the ETA the log printed then
    row = first.state["history"][0]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row["time"])
    assert row["eta_s"] == pytest.approx(2 * row["s_per_iter"])  # 2 epochs of 1 iteration, no evaluation left timed
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert checkpoint["options"] == {"eval_every": 2, "fused": "eager", "tensorboard": False, "pictures": False,
                                     "amp": False, "channels_last": False}
    import json
    assert json.loads((tmp_path / "run" / "config.json").read_text())["options"]["eval_every"] == 2
    # another evaluation cadence: allowed, noted
    lines = []
    ZSQTrainer(config, teacher, tmp_path / "run", resume=True, eval_every=1, log=lines.append, **quiet)
    notes = [line for line in lines if "other run options" in line]
    assert len(notes) == 1 and "eval_every 2 -> 1" in notes[0]
    # a checkpoint from before the options were saved: the ones given now, said
    del checkpoint["options"]
    torch.save(checkpoint, tmp_path / "run" / "checkpoint.pt")
    lines = []
    ZSQTrainer(config, teacher, tmp_path / "run", resume=True, eval_every=5, log=lines.append, **quiet)
    assert any("holds no run options" in line and "eval_every 5" in line for line in lines)
    checkpoint["options"] = {"eval_every": 2, "amp": False}
    # amp changes what is computed: a checkpoint written with it cannot continue without it
    checkpoint["options"]["amp"] = True
    torch.save(checkpoint, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(ValueError, match="amp: checkpoint True != now False"):
        ZSQTrainer(config, teacher, tmp_path / "run", resume=True, eval_every=2, log=lambda m: None, **quiet)


def test_the_recipe_resumes_with_the_run_options_it_started_with(tmp_path, capsys, load_script, monkeypatch):
    """``--resume --out DIR`` alone (the printed command) keeps --eval-every, --no-pictures and
    --no-tensorboard of the run; a flag given again changes them; --amp cannot change."""
    import json

    from granq_ao.zsq.data import shared_data_dir

    if not (shared_data_dir() / "weights" / "resnet20_cifar10.pth").is_file():
        pytest.skip("offline teacher not available")
    monkeypatch.setenv("GRANQ_FUSED", "eager")
    recipe = load_script("recipes/zsq_cifar.py")
    out = tmp_path / "run"
    common = ["--iters", "1", "--batch-size", "4", "--warmup-epochs", "0", "--eval-batch-size", "512"]
    assert recipe.main(["--epochs", "1", *common, "--eval-every", "3", "--no-tensorboard", "--no-pictures",
                        "--out", str(out)]) == 0
    assert recipe.main(["--resume", "--epochs", "3", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows if row.get("test_acc") is not None] == [1, 3]  # 1 and 3 = last epochs
    assert not (out / "tb").exists() and not (out / "accuracy.png").exists()
    assert "other run options" not in capsys.readouterr().out
    assert recipe.main(["--resume", "--epochs", "4", "--eval-every", "1", "--out", str(out)]) == 0
    assert "eval_every 3 -> 1" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(["--resume", "--epochs", "5", "--amp", "--out", str(out)])
    assert exit_info.value.code == 2 and "amp=False" in capsys.readouterr().err
