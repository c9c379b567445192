"""benchmarks/paper_iteration.py: each candidate is the recipe itself, and ``two_runs_1thread``
reports the machine's cost per iteration of two simultaneous runs (each run's s/iter, halved)."""
import json

import pytest

from granq_ao.zsq.data import shared_data_dir


def test_candidates_run_the_recipe_and_two_runs_are_halved(load_script, tmp_path, monkeypatch):
    if not (shared_data_dir() / "cifar10").is_dir():
        pytest.skip("offline CIFAR-10 subset not available")
    bench = load_script("benchmarks/paper_iteration.py")
    flags = bench.command("two_runs_1thread", tmp_path / "x", bench.argparse.Namespace(iters=2, bits=3))
    assert "--fold-bn" not in flags and "--preset" in flags and flags[1].endswith("zsq_cifar.py")
    seen = []
    real_popen = bench.subprocess.Popen

    def popen(cmd, **kwargs):
        seen.append(kwargs["env"]["OMP_NUM_THREADS"])
        return real_popen(cmd, **kwargs)

    monkeypatch.setattr(bench.subprocess, "Popen", popen)
    monkeypatch.setattr(bench, "evaluation_seconds", lambda args: 1.0)
    summary = bench.main(["--candidates", "default,two_runs_1thread", "--rounds", "1", "--iters", "2",
                          "--threads", "1", "--json", str(tmp_path / "out.json")])
    assert seen == ["1", "1", "1"]  # default (1 thread asked), then the two runs at once, 1 thread each
    assert all(v > 0 for values in summary["s_per_iter"].values() for v in values)
    assert json.loads((tmp_path / "out.json").read_text())["median"].keys() == {"default", "two_runs_1thread"}
    with pytest.raises(SystemExit):
        bench.main(["--candidates", "nope"])
