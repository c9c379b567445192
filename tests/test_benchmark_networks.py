"""benchmarks/networks_report.py (docs/NETWORKS.md tables and paired tests from run folders, export)
and benchmarks/qat_step_networks.py (a one-round smoke run)."""
import json

import pytest


def _fake_run(folder, correct, per_image, pre=5):
    folder.mkdir(parents=True)
    n = len(per_image)
    results = {"correct": {"teacher": 9, "pre_qat": pre, "final": correct}, "n_test": n,
               "intervals": {"teacher": [0.5, 0.9], "pre_qat": [0.2, 0.8], "final": [0.3, 0.9]},
               "final_acc": correct / n, "pre_qat_acc": pre / n, "mean_s_per_iter": 0.5,
               "fake_quants": {"activation": 7, "weight": 10}, "config": {"act_placement": "paper"}}
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "per_image.json").write_text(json.dumps(per_image))


def test_report_pairs_runs_on_the_same_images_and_export_keeps_them(tmp_path, load_script):
    report = load_script("benchmarks/networks_report.py")
    runs = tmp_path / "runs"
    base = runs / "resnet8_tiny_w4a4"
    _fake_run(base / "a-tensor_w-channel_l-entropy" / "seed0", 4, [1, 1, 0, 0, 0, 0, 1, 1, 0, 0])
    _fake_run(base / "a-granq_w-channel_l-entropy" / "seed0", 7, [1, 1, 1, 1, 1, 0, 1, 0, 1, 0])
    lines = report.report(runs, "resnet8_tiny", 4, [0], None)
    text = "\n".join(lines)
    assert "| tensor | 0 | 50.00 [20.0, 80.0] | 40.00 [30.0, 90.0] | -10.00 | 0.50 |" in text
    assert "| channel | 0 | (not run yet) |" in text
    # tensor -> granq: wrong then right at images 2, 3, 4, 8 (4 fixed); right then wrong at 7 (1 broken)
    assert "| tensor -> granq | 0 | 4 / 1 (p = 0.38) |" in text
    exported = report.export(runs, tmp_path / "kept")
    assert len(exported) == 2 and all((folder / "per_image.json").is_file() for folder in exported)
    assert "\n".join(report.report(tmp_path / "kept", "resnet8_tiny", 4, [0], None)) == text


def test_summary_rows_follow_the_plan_with_per_network_suffixes(tmp_path, load_script):
    report = load_script("benchmarks/networks_report.py")
    assert report.parse_seeds("4:0,1/3:0", [4, 3]) == {4: [0, 1], 3: [0]}
    assert report.parse_seeds("0,1", [4, 3]) == {4: [0, 1], 3: [0, 1]}
    assert report.parse_suffixes("resnet8_tiny=_bnsstd", ["resnet56a", "resnet8_tiny"]) == {
        "resnet56a": "", "resnet8_tiny": "_bnsstd"}
    runs = tmp_path / "runs"
    base = runs / "resnet8_tiny_w4a4_bnsstd"
    _fake_run(base / "a-tensor_w-channel_l-entropy" / "seed0", 4, [1, 1, 0, 0, 0, 0, 1, 1, 0, 0])
    _fake_run(base / "a-granq_w-channel_l-entropy" / "seed0", 7, [1, 1, 1, 1, 1, 0, 1, 0, 1, 0])
    _fake_run(runs / "resnet56a_w4a4" / "a-granq_w-channel_l-entropy" / "seed0", 7, [1] * 7 + [0] * 3)
    lines = report.summary_table(runs, ["resnet56a", "resnet8_tiny"], {4: [0, 1], 3: [0]},
                                 {"resnet56a": "", "resnet8_tiny": "_bnsstd"})
    rows = [line for line in lines if line.startswith("| resnet")]
    assert len(rows) == 6  # 2 networks x (2 seeds at W4A4 + 1 at W3A3)
    assert rows[3] == ("| resnet8_tiny_bnsstd | W4A4 | 0 | 40.00 [30.0, 90.0] | (not run yet) | 70.00 [30.0, 90.0] | "
                       "4 / 1 (p = 0.38) |  |")
    assert rows[0].startswith("| resnet56a | W4A4 | 0 | (not run yet) | (not run yet) | 70.00")


def test_qat_step_networks_smoke(load_script):
    pytest.importorskip("torch")
    bench = load_script("benchmarks/qat_step_networks.py")
    rows = bench.main(["--archs", "resnet8_tiny", "--rounds", "1", "--warmup", "0", "--batch", "2"])
    assert len(rows) == 1 and rows[0]["activation_calls"] == 7 and rows[0]["depthwise_convs"] == 0
    assert set(rows[0]["ratio_to_float"]) == {"float", "granq", "granq_fold_bn", "tensor"}
    assert all(value > 0 for value in rows[0]["ms"].values())


def test_doc_blocks_are_rewritten_and_kept_figures_stay_linked(tmp_path, load_script, monkeypatch):
    report = load_script("benchmarks/networks_report.py")
    runs = tmp_path / "runs"
    base = runs / "resnet8_tiny_w4a4"
    _fake_run(base / "a-tensor_w-channel_l-entropy" / "seed0", 4, [1, 1, 0, 0, 0, 0, 1, 1, 0, 0])
    _fake_run(base / "a-granq_w-channel_l-entropy" / "seed0", 7, [1, 1, 1, 1, 1, 0, 1, 0, 1, 0])
    # an exported run keeps no picture; the one copied by an earlier report stays linked
    monkeypatch.setattr(report, "REPO", tmp_path)
    figures = tmp_path / "docs" / "figures"
    figures.mkdir(parents=True)
    (figures / "resnet8_tiny_w4a4_seed0_activation_error.png").write_bytes(b"png")
    doc = tmp_path / "NETWORKS.md"
    doc.write_text("intro\n<!-- networks_report:summary:begin -->\nold\n<!-- networks_report:summary:end -->\nmiddle\n"
                   "<!-- networks_report:details:begin -->\nold\nold\n<!-- networks_report:details:end -->\nend\n")
    report.main(["--runs", str(runs), "--archs", "resnet8_tiny", "--bits", "4", "--seeds", "0", "--figures", str(figures),
                 "--doc", str(doc)])
    text = doc.read_text()
    assert text.startswith("intro\n<!-- networks_report:summary:begin -->\n| network |") and "old" not in text
    assert "\nmiddle\n" in text and text.endswith("<!-- networks_report:details:end -->\nend\n")
    assert "| tensor -> granq | 0 | 4 / 1 (p = 0.38) |" in text
    assert "![resnet8_tiny W4A4 seed 0: activation error](figures/resnet8_tiny_w4a4_seed0_activation_error.png)" in text
    with pytest.raises(ValueError, match="no <!-- networks_report:summary:begin -->"):
        report.replace_block("no markers", "summary", [])
