"""benchmarks/ablation.py: the plan, the statistics on synthetic finished runs, and one --quick run
(two recipe subprocesses on a tiny schedule) that a second call skips."""
import json
from pathlib import Path

import pytest
import torch

@pytest.fixture(scope="module")
def ablation(load_script):
    return load_script("benchmarks/ablation.py")


def test_full_plan_is_24_distinct_runs_with_the_right_flags(ablation, capsys):
    result = ablation.main(["--dry-run", "--out", "/nonexistent/ablation"])
    assert len(result["plan"]) == len(set(map(tuple, result["plan"]))) == 24  # 8 configurations x 3 seeds
    printed = capsys.readouterr().out.splitlines()
    commands = [line for line in printed if "zsq_cifar.py" in line]
    assert len(commands) == 24
    assert all("--dataset cifar100 --weight-bits 3 --act-bits 3" in c for c in commands)
    assert sum("--act-granularity granq_iterative" in c for c in commands) == 3
    assert sum("--weight-granularity kernel" in c for c in commands) == 6
    assert sum("--student-loss kl" in c for c in commands) == 6
    gdfq = [c for c in commands if "--generator-loss gdfq" in c]
    assert len(gdfq) == 6 and all("--gamma 0.1" in c and "--student-loss kl" in c for c in gdfq)


def _fake_run(folder: Path, per_image, pre_per_image):
    folder.mkdir(parents=True)
    n = len(per_image)
    acc, pre = sum(per_image) / n, sum(pre_per_image) / n
    (folder / "results.json").write_text(json.dumps({
        "final_acc": acc, "pre_qat_acc": pre, "teacher_acc": 0.7, "n_test": n,
        "intervals": {"final": [acc - 0.1, acc + 0.1]}, "wall_time_s": 1.0, "mean_s_per_iter": 0.1}))
    torch.save({"last": {"per_image": torch.tensor(per_image, dtype=torch.int8)}}, folder / "checkpoint.pt")


def test_statistics_and_paired_counts_on_synthetic_runs(ablation, tmp_path):
    Config = ablation.Config
    tensor, granq = Config(act="tensor"), Config(act="granq")
    # seed 0: tensor right on images 0-1, granq on 0-3 -> 2 fixed, 0 broken
    _fake_run(ablation.run_dir(tmp_path, tensor, 0), [1, 1, 0, 0, 0], [1, 0, 0, 0, 0])
    _fake_run(ablation.run_dir(tmp_path, granq, 0), [1, 1, 1, 1, 0], [1, 0, 0, 0, 0])
    # seed 1: tensor right on 0-2, granq on 1-4 -> fixed 2 (3, 4), broken 1 (0)
    _fake_run(ablation.run_dir(tmp_path, tensor, 1), [1, 1, 1, 0, 0], [1, 0, 0, 0, 0])
    _fake_run(ablation.run_dir(tmp_path, granq, 1), [0, 1, 1, 1, 1], [1, 0, 0, 0, 0])
    summary = ablation.summarize(tmp_path, ["act"], [0, 1])
    rows = {row["config"]: row for row in summary["groups"]["act"]["rows"]}
    assert rows[tensor.name]["mean"] == pytest.approx(50.0) and rows[tensor.name]["n"] == 2
    assert rows[tensor.name]["std"] == pytest.approx(14.1421356, rel=1e-6)  # sample std of 40, 60
    assert rows[granq.name]["mean"] == pytest.approx(80.0) and rows[granq.name]["std"] == pytest.approx(0.0)
    assert rows[Config(act="channel").name]["n"] == 0  # not run: reported as missing, not as zero
    comp = next(c for c in summary["groups"]["act"]["paired"]
                if (c["baseline"], c["compared"]) == (tensor.name, granq.name))
    assert comp["per_seed"][0]["fixed"] == 2 and comp["per_seed"][0]["broken"] == 0
    assert comp["per_seed"][1]["fixed"] == 2 and comp["per_seed"][1]["broken"] == 1
    assert comp["per_seed"][1]["mcnemar_exact_p"] == pytest.approx(1.0)
    assert comp["pooled_counts"] == {"fixed": 4, "broken": 1}
    ablation.write_outputs(tmp_path, summary)
    assert "| granq | 2 | 80.00 | 0.00 |" in (tmp_path / "ablation.md").read_text()
    assert (tmp_path / "runs.csv").read_text().count("\n") == 1 + 8  # header + 4 configs x 2 seeds


@pytest.mark.slow
def test_quick_mode_runs_two_recipes_and_resumes(ablation, tmp_path):
    summary = ablation.main(["--quick", "--out", str(tmp_path), "--threads", "1"])
    rows = summary["groups"]["act"]["rows"]
    assert [row["label"] for row in rows] == ["tensor", "granq"]
    assert all(row["n"] == 1 and row["n_test"] == 916 for row in rows)  # the offline CIFAR-100 subset
    comp = summary["groups"]["act"]["paired"][0]
    counts = comp["per_seed"][0]
    correct = {row["config"]: round(row["mean"] * 916 / 100) for row in rows}
    assert counts["fixed"] - counts["broken"] == correct[comp["compared"]] - correct[comp["baseline"]]
    finished = sorted(tmp_path.glob("*/seed0/results.json"))
    assert len(finished) == 2
    stamps = [p.stat().st_mtime_ns for p in finished]
    again = ablation.main(["--quick", "--out", str(tmp_path)])  # resumable: both runs are skipped
    assert [p.stat().st_mtime_ns for p in finished] == stamps
    assert again["groups"]["act"]["rows"][1]["mean"] == rows[1]["mean"]
