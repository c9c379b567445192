"""benchmarks/paper_schedule_report.py: the issue-19 table from finished and running paper-schedule
runs, the paired test against a short-schedule run, the curve and the export that carries a
running run's checkpoint."""
import json

import pytest

CONFIG = {"weight_bits": 3, "act_bits": 3, "act_granularity": "granq", "epochs": 200}
MACHINE = {"from_epoch": 0, "kernels": {"cpu": "AMD EPYC", "aten_capability": "AVX512", "threads": "1"},
           "date": "2026-12-03 08:40:00"}


def _history(epochs, accs):
    rows = []
    for epoch in range(1, epochs + 1):
        row = {"epoch": epoch, "phase": "warmup" if epoch <= 1 else "qat", "s_per_iter": 0.3 if epoch > 1 else 0.1}
        if epoch == 2:
            row["s_per_iter"] = 3.0  # a paused epoch: the median ignores it
        if epoch in accs:
            row["test_acc"] = accs[epoch]
        rows.append(row)
    return rows


def _finished(folder, per_image, config, teacher=9):
    folder.mkdir(parents=True)
    n = len(per_image)
    results = {"config": config, "run_info": {"dataset": "cifar10"}, "epochs_completed": config["epochs"],
               "correct": {"teacher": teacher, "final": sum(per_image)}, "n_test": n, "wall_time_s": 7200.0,
               "machines": [MACHINE]}
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "per_image.json").write_text(json.dumps(per_image))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _history(3, {3: sum(per_image) / n})))


def _running(folder, per_image, epoch):
    torch = pytest.importorskip("torch")
    folder.mkdir(parents=True)
    n = len(per_image)
    checkpoint = {"config": CONFIG, "run_info": {"dataset": "cifar10"}, "epoch": epoch,
                  "history": _history(epoch, {5: 0.5, 10: sum(per_image) / n}),
                  "teacher": {"correct": 9, "n": n}, "elapsed_s": 3600.0, "machines": [MACHINE],
                  "sessions": [{"from_epoch": 0, "date": "2026-12-03 08:40:00"}, {"from_epoch": 7, "date": "2026-12-03 11:31:00"}],
                  "last": {"correct": sum(per_image), "n": n, "per_image": torch.tensor(per_image)}}
    torch.save(checkpoint, folder / "checkpoint.pt")
    (folder / "config.json").write_text(json.dumps({"config": CONFIG}))


def test_running_run_is_reported_paired_with_the_short_run_and_carried(tmp_path, load_script):
    report = load_script("benchmarks/paper_schedule_report.py")
    running = tmp_path / "paper_w3a3"
    _running(running, [1, 1, 1, 1, 1, 1, 1, 0, 1, 0], epoch=12)
    short = tmp_path / "short_w3a3"
    _finished(short, [1, 1, 0, 0, 0, 1, 1, 1, 0, 0], dict(CONFIG, epochs=10))
    lines = report.main([str(running), "--short", str(short), "--figure", str(tmp_path / "curve.png"),
                         "--export", str(tmp_path / "kept"), "--carry"])
    text = "\n".join(lines)
    # 8 of 10 at epoch 10 (the last evaluation), teacher 9 of 10: gap -10 points; paper W3A3 91.37 vs FP 93.89
    assert ("| W3A3 granq | 12 / 200 (running) | 80.00 [49.0, 94.3] (10) | -10.00 | 80.00 (10) | 91.37 (gap -2.52) | 0.300 | "
            "1.00 | 1.00 | AMD EPYC (AVX512, 1 thread) from epoch 0, 2026-12-03 08:40; sessions started "
            "2026-12-03 08:40 (from epoch 0), 2026-12-03 11:31 (from epoch 7) |") in text
    # short -> paper: wrong then right at images 2, 3, 4, 8 (4 fixed); right then wrong at 7 (1 broken)
    assert "| W3A3 granq: short 50.00 [23.7, 76.3] -> epoch 10 | 4 / 1 (p = 0.38) |" in text
    assert (tmp_path / "curve.png").stat().st_size > 10_000
    kept = tmp_path / "kept" / "paper_w3a3"
    assert (kept / "checkpoint.pt").is_file() and (kept / "config.json").is_file()
    # the exported copy reads back to the same table
    assert "\n".join(report.report([report.read_run(kept)], [report.read_run(short)])) == text


def test_finished_run_drops_the_carried_checkpoint_and_unpaired_settings_say_so(tmp_path, load_script):
    report = load_script("benchmarks/paper_schedule_report.py")
    finished = tmp_path / "paper_w3a3"
    _finished(finished, [1] * 9 + [0], CONFIG)
    kept = tmp_path / "kept" / "paper_w3a3"
    kept.mkdir(parents=True)
    (kept / "checkpoint.pt").write_bytes(b"carried from an earlier session")
    short_w4 = tmp_path / "short_w4a4"
    _finished(short_w4, [1] * 10, dict(CONFIG, weight_bits=4, act_bits=4, epochs=10))
    lines = report.main([str(finished), "--short", str(short_w4), "--export", str(tmp_path / "kept"), "--carry"])
    assert "| W3A3 granq | 200 / 200 | 90.00 [59.6, 98.2] (200) | +0.00 |" in "\n".join(lines)
    assert "| W4A4 granq | (no paper-schedule run with these settings) |" in lines
    assert not (kept / "checkpoint.pt").exists() and json.loads((kept / "per_image.json").read_text()) == [1] * 9 + [0]


def test_folder_without_a_run_is_one_line_exit_2(tmp_path, load_script, capsys):
    report = load_script("benchmarks/paper_schedule_report.py")
    with pytest.raises(SystemExit) as stop:
        report.main([str(tmp_path)])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path} holds no run (neither results.json nor checkpoint.pt)"


def test_best_on_test_is_the_earliest_maximum_and_absent_without_evaluations(load_script):
    report = load_script("benchmarks/paper_schedule_report.py")
    history = [{"epoch": 5, "test_acc": 0.9}, {"epoch": 7}, {"epoch": 10, "test_acc": 0.8}, {"epoch": 15, "test_acc": 0.9}]
    assert report.best_on_test({"history": history}) == (0.9, 5)
    assert report.best_on_test({"history": [{"epoch": 1}]}) is None


def test_eta_check_compares_the_logged_eta_with_the_wall_time_of_the_last_uninterrupted_stretch(load_script):
    report = load_script("benchmarks/paper_schedule_report.py")

    def row(epoch, minute, eta_minutes):
        return {"epoch": epoch, "phase": "qat", "train_time_s": 60.0, "eval_time_s": None,
                "time": f"2026-12-03T10:{minute:02d}:00Z", "eta_s": 60.0 * eta_minutes}

    # epochs 5-6 before a 20-minute pause, then 7-10 a minute apart; the ETA said 4 minutes after
    # epoch 7 and 0 at the end (3 epochs, 3 minutes): a third too high
    history = [row(5, 0, 10), row(6, 1, 9), row(7, 21, 4), row(8, 22, 3), row(9, 23, 1), row(10, 24, 0)]
    check = report.eta_check({"history": history})
    assert (check["from_epoch"], check["to_epoch"]) == (7, 10)
    assert check["predicted_s"] == 240.0 and check["actual_s"] == 180.0
    assert check["error"] == pytest.approx(1 / 3)
    # rows from before the rows carried a time (older runs): nothing to check
    assert report.eta_check({"history": [{"epoch": 1, "phase": "qat", "s_per_iter": 0.3}]}) is None


def test_runs_with_other_weight_ranges_are_told_apart_and_paired_only_with_their_own(tmp_path, load_script):
    report = load_script("benchmarks/paper_schedule_report.py")
    channel, kernel, short = tmp_path / "paper_w3a3", tmp_path / "paper_w3a3_kernel", tmp_path / "short_w3a3"
    _finished(channel, [1] * 5 + [0] * 5, CONFIG)
    _finished(kernel, [1] * 8 + [0] * 2, dict(CONFIG, weight_granularity="kernel"))
    _finished(short, [1] * 10, dict(CONFIG, epochs=10))
    lines = report.main([str(channel), str(kernel), "--short", str(short), "--figure", str(tmp_path / "c.png")])
    text = "\n".join(lines)
    # both rows carry the paper's one W3A3 number; the kernel run is named as such
    assert "| W3A3 granq, kernel weights | 200 / 200 | 80.00 [49.0, 94.3] (200) | -10.00 |" in text
    assert "| W3A3 granq | 200 / 200 | 50.00 [23.7, 76.3] (200) | -40.00 |" in text
    assert text.count("| 91.37 (gap -2.52) |") == 2
    # the short (per-channel) run pairs with the per-channel run, not with the later-listed kernel one
    assert "| W3A3 granq: short 100.00 [72.2, 100.0] -> epoch 200 | 0 / 5 (p = 0.062) |" in text


def test_an_eta_that_grew_is_shown_negative_not_as_zero(load_script):
    report = load_script("benchmarks/paper_schedule_report.py")
    assert report.signed_duration(-11105.0) == "-03:05:05"
    assert report.signed_duration(5.0) == "00:05"
