"""Smoke test of benchmarks/fake_quant_latency.py and benchmarks/harness.py: tiny runs (1
repetition), table shape, the --check targets. No timing asserts."""
import json
import platform

import pytest
import torch


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("benchmarks/fake_quant_latency.py")


@pytest.fixture(scope="module")
def harness(load_script):
    return load_script("benchmarks/harness.py")


@pytest.fixture(autouse=True)
def eager(monkeypatch):
    monkeypatch.setenv("GRANQ_FUSED", "0")  # no 20 s compile in the smoke test


# every candidate except the one that compiles unconditionally (fused=True)
EAGER_CANDIDATES = ["clone", "torchao_fq", "torchao_fused", "tensor", "channel", "granq_iterative",
                    "granq", "granq_fn_eager"]
MODES = ("fwd", "fwdgrad", "fwdbwd")
ROW_KEYS = {"shape", "candidate"} | {f"{mode}_{key}" for mode in MODES
                                     for key in ("ms", "min_ms", "reps", "x_clone", "x_torchao_fq")}


def test_candidate_and_shape_vocabulary(bench):
    assert list(bench.CANDIDATES) == EAGER_CANDIDATES[:5] + ["granq_iterative", "granq", "granq_fn_eager",
                                                              "granq_fn_compiled", "torchao_intx", "modelopt_dynamic"]
    assert set(bench.OPTIONAL_CANDIDATES) == {"torchao_intx", "modelopt_dynamic"}
    assert bench.act_shapes([16, 200]) == [(16, 16, 32, 32), (16, 32, 16, 16), (16, 64, 8, 8),
                                           (200, 16, 32, 32), (200, 32, 16, 16), (200, 64, 8, 8)]
    assert bench.TARGET_SHAPE in bench.act_shapes(bench.DEFAULT_BATCHES)


def test_latency_rows_and_ratios(bench):
    rows = bench.run_latency(batches=[1], candidates=EAGER_CANDIDATES, bits=3, reps=1, warmup=0,
                             min_time_s=0.0, max_reps=1, iterative="all", iterative_reps=1)
    assert [(tuple(r["shape"]), r["candidate"]) for r in rows] == [
        (shape, name) for shape in [(1, 16, 32, 32), (1, 32, 16, 16), (1, 64, 8, 8)] for name in EAGER_CANDIDATES]
    for row in rows:
        assert set(row) == ROW_KEYS
        assert row["fwd_reps"] == row["fwdgrad_reps"] == row["fwdbwd_reps"] == 1
        assert row["fwd_ms"] > 0 and row["fwdgrad_ms"] > 0 and row["fwdbwd_ms"] > 0
        for mode in MODES:
            assert row[f"{mode}_x_clone"] == pytest.approx(
                row[f"{mode}_ms"] / next(r for r in rows if r["shape"] == row["shape"]
                                         and r["candidate"] == "clone")[f"{mode}_ms"])
    references = [r for r in rows if r["candidate"] in ("clone", "torchao_fq")]
    assert all(r["fwd_x_clone" if r["candidate"] == "clone" else "fwd_x_torchao_fq"] == 1.0 for r in references)
    table = bench.format_latency_table(rows)
    assert table.count("shape (1, ") == 3
    for name in EAGER_CANDIDATES:
        assert sum(line.startswith(name + " ") for line in table.splitlines()) == 3


def test_iterative_only_at_target_and_missing_reference(bench):
    rows = bench.run_latency(batches=[1], candidates=["granq", "granq_iterative"], reps=1, warmup=0,
                             min_time_s=0.0, max_reps=1, iterative="target")
    assert {r["candidate"] for r in rows} == {"granq"}  # batch 1 never reaches the target shape
    assert all(r["fwd_x_clone"] is None and r["fwdbwd_x_torchao_fq"] is None for r in rows)
    with pytest.raises(ValueError, match="unknown candidates"):
        bench.run_latency(batches=[1], candidates=["nope"])


def test_modes_compute_the_input_gradient(bench):
    """fwdgrad hands back d(out)/dx without touching x.grad; fwdbwd accumulates into x.grad."""
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    grad = torch.randn(2, 16, 4, 4)
    op = bench.make_fake_quant("granq", 3, torch.device("cpu"))
    assert bench.mode_call(op, x, grad, "fwd")().shape == x.shape
    (dx,) = bench.mode_call(op, x, grad, "fwdgrad")()
    assert torch.equal(dx, grad) and x.grad is None  # straight-through
    assert bench.mode_call(op, x, grad, "fwdbwd")() is None
    assert torch.equal(x.grad, grad) and x.grad is not grad  # AccumulateGrad stored a copy
    assert list(bench.MODE_TITLES) == list(MODES)


def test_warm_malloc(harness):
    applied = harness.warm_malloc()
    if platform.libc_ver()[0] == "glibc":
        assert applied is True  # both mallopt calls accepted (C int values)
    else:
        assert applied is False
    big = torch.full((16 * 2**20 // 4,), 2.0)  # a 16 MiB block, freed and reused below
    del big
    assert torch.full((16 * 2**20 // 4,), 3.0).sum() == 3.0 * 2**22  # the allocator still works


def test_candidates_fake_quantize(bench):
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver

    from granq_ao import functional as F

    x = torch.randn(2, 16, 4, 4)
    cpu = torch.device("cpu")
    granularity_of = {"tensor": "tensor", "channel": "channel", "granq_iterative": "granq",
                      "granq": "granq", "granq_fn_eager": "granq"}
    for name, granularity in granularity_of.items():
        y = bench.make_fake_quant(name, 3, cpu)(x)
        assert torch.equal(y, F.fake_quantize(x, 3, granularity, fused=False)), name
    torch_ao = FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=7,
                            dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    expected = torch_ao(x)
    for name in ("torchao_fq", "torchao_fused"):
        y = bench.make_fake_quant(name, 3, cpu)(x)
        assert torch.allclose(y, expected, rtol=0, atol=1e-6) and torch.unique(y).numel() <= 8, name
    assert torch.equal(bench.make_fake_quant("clone", 3, cpu)(x), x)


@pytest.mark.parametrize("bits", [3, 4])
def test_torchao_intx_candidate_computes_granq_numbers(bench, bits):
    """The issue's measured lead, kept tested: torchao's per-token IntxFakeQuantizer on the
    (N*C, H*W) view gives exactly GranQ's fake-quantized values (0.0 difference)."""
    pytest.importorskip("torchao")
    from granq_ao import functional as F

    x = torch.randn(8, 16, 6, 6)
    y = bench.make_fake_quant("torchao_intx", bits, torch.device("cpu"))(x)
    assert torch.equal(y, F.fake_quantize(x, bits, "granq", fused="eager"))


def test_modelopt_dynamic_candidate_is_symmetric_per_sample_channel(bench):
    """modelopt's dynamic quantizer is symmetric abs-max per (n, c): not GranQ's numbers."""
    pytest.importorskip("modelopt")
    x = torch.randn(4, 8, 5, 5)
    y = bench.make_fake_quant("modelopt_dynamic", 4, torch.device("cpu"))(x)
    amax = x.abs().amax(dim=(2, 3), keepdim=True)
    assert torch.allclose(y, torch.round(x / amax * 7).clamp(-8, 7) * amax / 7, atol=1e-6)
    assert not torch.equal(y, __import__("granq_ao").functional.fake_quantize(x, 4, "granq", fused="eager"))


def test_targets_pass_fail(bench):
    shape = list(bench.TARGET_SHAPE)
    times = {"clone": (1.0, 1.0), "torchao_fq": (10.0, 10.0), "granq": (2.0, 3.0), "granq_iterative": (110.0, 120.0)}
    latency = [{"shape": shape, "candidate": name, "fwd_ms": fwdgrad / 2, "fwdgrad_ms": fwdgrad, "fwdbwd_ms": fwdbwd}
               for name, (fwdgrad, fwdbwd) in times.items()]
    targets = bench.evaluate_targets(latency)
    assert [(t["status"], round(t["value"], 3) if t["value"] is not None else None) for t in targets] == [
        ("PASS", 2.0), ("PASS", 0.2), ("PASS", 55.0),   # fwd+bwd via autograd.grad
        ("PASS", 3.0), ("FAIL", 0.3), ("FAIL", 40.0),   # fwd+bwd into a leaf
        ("PASS", 55.0)]                                  # forward speed-up over granq_iterative
    assert "[FAIL]" in bench.format_targets(targets)
    assert all(t["status"] == "n/a" for t in bench.evaluate_targets(latency[:1]))  # clone alone: no ratio


QUICK = ["--quick", "--batches", "1", "--reps", "1", "--candidates", "clone,torchao_fq,granq"]


def test_main_quick_json(bench, tmp_path, capsys):
    out = tmp_path / "result.json"
    bench.main(QUICK + ["--json", str(out)])
    printed = capsys.readouterr().out
    for word in ("torch", "threads", "date", "x ao-FQ"):
        assert word in printed
    assert "targets" not in printed  # only with --check
    result = json.loads(out.read_text())
    assert set(result) == {"environment", "settings", "latency", "targets"}
    assert len(result["latency"]) == 3 * 3
    assert all(t["status"] == "n/a" for t in result["targets"])  # batch 1: not the target shape


def test_check_prints_the_targets_and_fails_on_a_missed_one(bench, monkeypatch, capsys):
    bench.main(QUICK + ["--check"])  # every target n/a at batch 1: passes
    assert "[n/a ]" in capsys.readouterr().out
    missed = [{"target": "granq <= 1", "value": 2.0, "limit": 1.0, "op": "<=", "status": "FAIL"}]
    monkeypatch.setattr(bench, "evaluate_targets", lambda rows: missed)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(QUICK + ["--check"])
    assert exit_info.value.code == 1 and "[FAIL] granq <= 1" in capsys.readouterr().out
