"""Smoke test of benchmarks/qat_step_toolchains.py: every row builds and steps at a tiny batch,
quantizer counts per toolchain, FX and PT2E GranQ agree on the first loss, peak memory and the
--check targets. No timing asserts."""
import pytest
import torch

pytest.importorskip("torchao")
pytest.importorskip("pytorchcv")


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("benchmarks/qat_step_toolchains.py")


def test_every_row_counts_and_agrees(bench, monkeypatch):
    monkeypatch.setenv("GRANQ_FUSED", "0")
    table = bench.run(list(bench.ROWS), bits=3, batch=4, rounds=1, warmup=1, log=lambda line: None)
    rows = {entry["row"]: entry for entry in table}
    counts = {name: (entry["weights"], entry["act_calls"]) for name, entry in rows.items()}
    assert counts == {"float": (0, 0), "fx_granq_all": (22, 34), "fx_granq_paper": (22, 19),
                      "pt2e_granq_all": (22, 34), "pt2e_granq_paper": (22, 19), "quantize_granq": (22, 22),
                      "fx_ao_x86": (22, 34), "fx_ao_x86_fused": (22, 34), "pt2e_x86_int8": (22, 24),
                      "quantize_intx": (1, 1)}
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


def test_peak_memory_and_targets(bench, monkeypatch):
    monkeypatch.setenv("GRANQ_FUSED", "0")
    table = bench.run(["fx_granq_paper", "fx_ao_x86"], bits=3, batch=2, rounds=1, warmup=1, memory=True,
                      log=lambda line: None)
    rows = {entry["row"]: entry for entry in table}
    assert all(entry["peak_mib"] > 0 for entry in table)
    assert rows["fx_ao_x86"]["peak_x_fx_ao_x86"] == 1.0
    assert rows["fx_granq_paper"]["peak_x_fx_ao_x86"] == pytest.approx(
        rows["fx_granq_paper"]["peak_mib"] / rows["fx_ao_x86"]["peak_mib"])
    assert "peak MiB" in bench.format_table(table)
    targets = bench.evaluate_targets(table)
    assert [t["status"] == "n/a" for t in targets] == [True, True, False, False]  # fx_granq_all not run
    assert targets[3]["value"] == rows["fx_granq_paper"]["peak_x_fx_ao_x86"]


def test_torchao_mapping_ranges(bench):
    qconfig = bench.torchao_qat_mapping(3).global_qconfig
    act, weight = qconfig.activation(), qconfig.weight()
    assert (act.quant_min, act.quant_max) == (0, 7)
    assert (weight.quant_min, weight.quant_max) == (-4, 3)
    assert weight.qscheme == torch.per_channel_symmetric and weight.ch_axis == 0
    fused = bench.torchao_qat_mapping(3, fused=True).global_qconfig.activation()
    assert type(fused).__name__ == "FusedMovingAvgObsFakeQuantize"
