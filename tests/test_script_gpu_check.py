"""scripts/gpu_check.sh: --dry-run prints the plan and checks imports on any machine; without a GPU a
real run refuses (exit 3) instead of writing empty results."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def run(*args, tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args, "--out", str(tmp_path / "gpu")], capture_output=True,
                          text=True, env=env, timeout=300)


def test_dry_run_prints_the_plan_and_checks_imports(tmp_path):
    result = run("--dry-run", tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for expected in ("tests/test_repro_cuda.py", "fake_quant_latency.py --device cuda", "--check", "figure5.py",
                     "paper_slice.py --device cuda", "imports ok", "tests/test_repro_cuda.py collects",
                     "nothing ran on a GPU"):
        assert expected in out, expected
    assert not (tmp_path / "gpu").exists()  # a dry run writes no results folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_real_run_without_cuda_refuses(tmp_path):
    result = run(tmp_path=tmp_path)
    assert result.returncode == 3 and "no CUDA device" in result.stderr
    assert not (tmp_path / "gpu").exists()


def test_unknown_argument_is_an_error(tmp_path):
    assert run("--bogus", tmp_path=tmp_path).returncode == 2
