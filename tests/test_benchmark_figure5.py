"""benchmarks/figure5.py on a tiny synthetic latency JSON (no timing is run)."""
import json

import pytest

@pytest.fixture(scope="module")
def figure5(load_script):
    return load_script("benchmarks/figure5.py")


def synthetic_report():
    rows = []
    for n in (16, 200):
        for shape in ((n, 16, 32, 32), (n, 64, 8, 8)):
            base = n / 16
            for name, factor in (("clone", 1.0), ("tensor", 3.0), ("channel", 4.0), ("granq", 2.0),
                                 ("granq_iterative", 50.0), ("torchao_fq", 10.0)):
                if name == "granq_iterative" and shape != (200, 16, 32, 32):
                    continue  # timed only at the target shape, as with --iterative target
                rows.append({"shape": list(shape), "candidate": name, "fwd_ms": base * factor,
                             "fwdgrad_ms": base * factor * 2, "fwdbwd_ms": None if name == "tensor" else base})
    return {"environment": {"device": "cpu", "threads": 2, "date": "2026-11-30"}, "latency": rows}


def test_ratios_to_clone_per_shape_family(figure5):
    data = figure5.series(synthetic_report(), "fwd")
    assert sorted(data) == [(16, 32, 32), (64, 8, 8)]
    assert data[(16, 32, 32)]["granq"] == [(16, 2.0, 2.0), (200, 2.0, 25.0)]
    assert data[(16, 32, 32)]["granq_iterative"] == [(200, 50.0, 625.0)]
    assert "granq_iterative" not in data[(64, 8, 8)]
    assert "torchao_fq" not in data[(16, 32, 32)]  # only the paper's four methods
    grad = figure5.series(synthetic_report(), "fwdgrad")
    assert grad[(64, 8, 8)]["channel"][0][1] == pytest.approx(4.0)
    assert "tensor" not in figure5.series(synthetic_report(), "fwdbwd")[(16, 32, 32)]  # missing values skipped


def test_cli_writes_png_and_table(figure5, tmp_path, capsys):
    path = tmp_path / "latency.json"
    path.write_text(json.dumps(synthetic_report()))
    figure5.main([str(path)])
    png = tmp_path / "figure5_fwd.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out
    assert "| (N, 16, 32, 32) | granq_iterative | n/a | 625.000 ms (50.00x) |" in table
    with pytest.raises(SystemExit):
        empty = tmp_path / "empty.json"
        empty.write_text(json.dumps({"latency": []}))
        figure5.main([str(empty)])
