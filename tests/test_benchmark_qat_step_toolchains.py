"""Smoke test of benchmarks/qat_step_toolchains.py: every row builds and steps at a tiny batch,
quantizer counts per toolchain, FX and PT2E GranQ agree on the first loss. No timing asserts."""
import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchao")
pytest.importorskip("pytorchcv")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "qat_step_toolchains.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("qat_step_toolchains", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_row_counts_and_agrees(bench, monkeypatch):
    monkeypatch.setenv("GRANQ_FUSED", "0")
    table = bench.run(list(bench.ROWS), bits=3, batch=4, rounds=1, warmup=1, log=lambda line: None)
    rows = {entry["row"]: entry for entry in table}
    counts = {name: (entry["weights"], entry["act_calls"]) for name, entry in rows.items()}
    assert counts == {"float": (0, 0), "fx_granq_all": (22, 34), "fx_granq_paper": (22, 19),
                      "pt2e_granq_all": (22, 34), "pt2e_granq_paper": (22, 19), "quantize_granq": (22, 22),
                      "fx_ao_x86": (22, 34), "pt2e_x86_int8": (22, 24), "quantize_intx": (1, 1)}
    for placement in ("all", "paper"):
        assert rows[f"pt2e_granq_{placement}"]["first_loss"] == pytest.approx(
            rows[f"fx_granq_{placement}"]["first_loss"], rel=1e-6)
    assert rows["pt2e_granq_all"]["x_fx_granq"] == pytest.approx(
        rows["pt2e_granq_all"]["step_ms"] / rows["fx_granq_all"]["step_ms"])
    assert "| `quantize_intx` |" in bench.format_table(table)


def test_unknown_row_is_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--rows", "float,int2"])
    assert "unknown rows int2" in capsys.readouterr().err
