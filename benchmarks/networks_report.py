"""The tables and pictures of docs/NETWORKS.md from the evidence runs (``benchmarks/ablation.py --arch``).

Reads ``<runs>/<arch>_w<b>a<b>/a-<act>_w-channel_l-entropy/seed<s>/`` (``results.json``, the
per-image correctness in ``checkpoint.pt``, ``activation_error.json``/``.png``) for the activation
granularities ``tensor``, ``channel``, ``granq`` and prints, per network and bit width:

* one row per (granularity, seed): pre-QAT and final top-1 with n and the 95% Wilson interval;
* per seed, exact McNemar tests on the same images: granq vs tensor, granq vs channel, channel vs
  tensor (fixed = wrong in the first and right in the second, broken = the reverse);
* from the GranQ run's activation errors (``||X - Q(X)|| / ||X||`` per quantized activation,
  layer-wise vs GranQ ranges, before and after QAT), the mean over the activations that follow a
  depthwise conv and over the others.

With ``--figures DIR`` it copies each GranQ run's ``activation_error.png`` there as
``<arch>_w<b>a<b>_seed<s>_activation_error.png`` (and links a picture copied there earlier when the
run folder is an export without it). With ``--doc docs/NETWORKS.md`` it rewrites that page's
``<!-- networks_report:summary/details:begin/end -->`` blocks with the tables.

    python benchmarks/networks_report.py --runs runs/networks --figures docs/figures/networks \
        --suffix resnet8_tiny=_bnsstd --doc docs/NETWORKS.md   # W4A4 seeds 0, 1 and W3A3 seed 0 (--seeds 4:0,1/3:0)
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ACTS = ("tensor", "channel", "granq")
PAIRS = (("tensor", "granq"), ("channel", "granq"), ("tensor", "channel"))


def run_folder(runs: Path, arch: str, bits: int, act: str, seed: int, suffix: str = "") -> Path:
    return runs / f"{arch}_w{bits}a{bits}{suffix}" / f"a-{act}_w-channel_l-entropy" / f"seed{seed}"


_FINISHED: Dict[Path, Dict[str, object]] = {}  # read() of finished runs: a finished run's files do not change


def read(folder: Path) -> Optional[Dict[str, object]]:
    """Accuracies, intervals and per-image final correctness of a finished run (else None); each
    finished run is read once per process (the summary, the per-run tables and the export share it)."""
    if not (folder / "results.json").is_file():
        return None
    key = folder.resolve()
    if key not in _FINISHED:
        _FINISHED[key] = _read_finished(folder)
    return _FINISHED[key]


def _read_finished(folder: Path) -> Dict[str, object]:
    results = json.loads((folder / "results.json").read_text())
    per_image = None
    if (folder / "per_image.json").is_file():  # an exported record (--export)
        per_image = json.loads((folder / "per_image.json").read_text())
    elif (folder / "checkpoint.pt").is_file():
        from granq_ao.zsq.checkpoint import load_checkpoint

        from benchmarks.ablation import final_per_image

        per_image = final_per_image(load_checkpoint(folder / "checkpoint.pt"))
    return {"results": results, "per_image": per_image}


def accuracy(results: Dict[str, object], key: str) -> str:
    correct, n = results["correct"][key], results["n_test"]
    low, high = results["intervals"][key]
    return f"{100 * correct / n:.2f} [{100 * low:.1f}, {100 * high:.1f}]"


def mcnemar(a: Sequence[int], b: Sequence[int]) -> str:
    """``fixed / broken (p = ...)`` of :func:`benchmarks.ablation.paired` (same images, a then b)."""
    from benchmarks.ablation import paired

    test = paired(a, b)
    return f"{test['fixed']} / {test['broken']} (p = {test['mcnemar_exact_p']:.2g})"


def paired_runs(a: Optional[Dict[str, object]], b: Optional[Dict[str, object]]) -> Optional[str]:
    """:func:`mcnemar` of two runs read by :func:`read`, or None unless both finished with per-image results."""
    if a and b and a["per_image"] and b["per_image"]:
        return mcnemar(a["per_image"], b["per_image"])
    return None


def depthwise_fed(arch: str, labels: Sequence[str]) -> List[bool]:
    """For each activation label (the module whose output is quantized), whether the nearest conv
    before it, in the teacher's module order, is depthwise."""
    from granq_ao.zsq.teachers import CIFAR_TEACHERS
    import torch

    model = CIFAR_TEACHERS[arch].build(10)
    last_conv_depthwise, fed = None, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            last_conv_depthwise = module.groups > 1 and module.groups == module.in_channels
        fed[name] = bool(last_conv_depthwise)
    return [fed.get(label, False) for label in labels]


def depthwise_split(arch: str, layers: Sequence[str], values: Dict[str, Sequence[float]]
                    ) -> Dict[str, Dict[str, float]]:
    """Per-layer ``values`` (one list per method, in ``layers`` order) averaged over the layers that
    follow a depthwise conv (:func:`depthwise_fed`) and over the others:
    ``{"after depthwise": {"layers": n, method: mean, ...}, "other": {...}}``; a group with no
    layer is left out."""
    flags = depthwise_fed(arch, layers)
    groups = {}
    for group, keep in (("after depthwise", True), ("other", False)):
        chosen = [i for i, flag in enumerate(flags) if flag == keep]
        if chosen:
            groups[group] = {"layers": len(chosen),
                             **{method: statistics.mean(per_layer[i] for i in chosen)
                                for method, per_layer in values.items()}}
    return groups


def error_summary(arch: str, folder: Path) -> Optional[str]:
    path = folder / "activation_error.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    parts = []
    for stage in ("before_qat", "after_qat"):
        record = data.get(stage)
        if not record:
            continue
        groups = depthwise_split(arch, record["layers"], {"tensor": record["tensor"], "granq": record["granq"]})
        for group, means in groups.items():
            tensor, granq = means["tensor"], means["granq"]
            parts.append(f"{stage.replace('_', ' ')}, {group} ({means['layers']}): layer-wise {tensor:.3f}, "
                         f"GranQ {granq:.3f} ({tensor / granq:.1f}x)")
    return "; ".join(parts)


def report(runs: Path, arch: str, bits: int, seeds: Sequence[int], figures: Optional[Path], suffix: str = ""
           ) -> List[str]:
    found = {(act, seed): read(run_folder(runs, arch, bits, act, seed, suffix)) for act in ACTS for seed in seeds}
    if not any(found.values()):
        return []
    any_run = next(v for v in found.values() if v)["results"]
    lines = [f"### {arch}, W{bits}A{bits}{suffix.replace('_', ', ')}", "",
             f"Teacher {accuracy(any_run, 'teacher')} (n = {any_run['n_test']}); "
             f"{any_run['fake_quants']['activation']} activation and {any_run['fake_quants']['weight']} weight "
             f"fake-quants ({any_run['config']['act_placement']} placement).", "",
             "| activations | seed | pre-QAT | final | final - pre-QAT | s/iter |", "|---|---|---|---|---|---|"]
    for act in ACTS:
        for seed in seeds:
            run = found[(act, seed)]
            if run is None:
                lines.append(f"| {act} | {seed} | (not run yet) | | | |")
                continue
            r = run["results"]
            delta = 100 * (r["final_acc"] - r["pre_qat_acc"])
            lines.append(f"| {act} | {seed} | {accuracy(r, 'pre_qat')} | {accuracy(r, 'final')} | {delta:+.2f} | "
                         f"{r['mean_s_per_iter']:.2f} |")
    lines += ["", "| paired, same images (final) | seed | fixed / broken (exact McNemar p) |", "|---|---|---|"]
    for first, second in PAIRS:
        for seed in seeds:
            test = paired_runs(found[(first, seed)], found[(second, seed)])
            if test:
                lines.append(f"| {first} -> {second} | {seed} | {test} |")
    for seed in seeds:
        folder = run_folder(runs, arch, bits, "granq", seed, suffix)
        summary = error_summary(arch, folder) if found[("granq", seed)] else None
        if summary:
            lines += ["", f"Activation error of the GranQ run, seed {seed} (mean relative error): {summary}."]
        if figures is None or not found[("granq", seed)]:
            continue
        target = figures / f"{arch}_w{bits}a{bits}{suffix}_seed{seed}_activation_error.png"
        if (folder / "activation_error.png").is_file():
            figures.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / "activation_error.png", target)
        if target.is_file():  # copied now, or earlier from a run whose folder kept only the small files (--export)
            lines += ["", f"![{arch} W{bits}A{bits} seed {seed}: activation error]({target.relative_to(REPO / 'docs')})"]
    return lines + [""]


def export(runs: Path, dest: Path) -> List[Path]:
    """Copy the small files of every finished run under ``runs`` to ``dest`` (same layout):
    ``results.json``, ``metrics.jsonl``, ``activation_error.json``, ``RESUME.txt`` and the final
    per-image correctness as ``per_image.json`` (from ``checkpoint.pt``), so that the tables and the
    paired tests can be redone, and the ablation runner skips these runs, without the checkpoints."""
    done = []
    for results in sorted(runs.glob("*/*/seed*/results.json")):
        folder = results.parent
        target = dest / folder.relative_to(runs)
        target.mkdir(parents=True, exist_ok=True)
        for name in ("results.json", "metrics.jsonl", "activation_error.json", "RESUME.txt"):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, target / name)
        run = read(folder)
        if run and run["per_image"] is not None:
            (target / "per_image.json").write_text(json.dumps(run["per_image"]))
        done.append(target)
    return done


def parse_seeds(text: str, bits: Sequence[int]) -> Dict[int, List[int]]:
    """``"4:0,1/3:0"`` -> {4: [0, 1], 3: [0]}; a plain ``"0,1"`` applies to every bit width."""
    if ":" not in text:
        return {b: [int(s) for s in text.split(",")] for b in bits}
    plan = {}
    for part in text.split("/"):
        b, seeds = part.split(":")
        plan[int(b)] = [int(s) for s in seeds.split(",") if s.strip()]
    return {b: plan.get(b, []) for b in bits}


def parse_suffixes(text: str, archs: Sequence[str]) -> Dict[str, str]:
    """``"resnet8_tiny=_bnsstd"`` -> that suffix for that network, "" for the others; a plain
    suffix applies to every network."""
    if "=" not in text:
        return {arch: text for arch in archs}
    given = dict(part.split("=", 1) for part in text.split(",") if part)
    return {arch: given.get(arch, "") for arch in archs}


def summary_table(runs: Path, archs: Sequence[str], plan: Dict[int, List[int]], suffixes: Dict[str, str]
                  ) -> List[str]:
    """One row per (network, bits, seed) of the plan: final top-1 of the three granularities and
    the paired tests of GranQ against each (``(not run yet)`` where a run is missing)."""
    lines = ["| network | bits | seed | layer-wise | channel-wise | GranQ | layer-wise -> GranQ | "
             "channel-wise -> GranQ |", "|---|---|---|---|---|---|---|---|"]
    for arch in archs:
        for bits, seeds in plan.items():
            for seed in seeds:
                found = {act: read(run_folder(runs, arch, bits, act, seed, suffixes[arch])) for act in ACTS}
                cells = [accuracy(found[act]["results"], "final") if found[act] else "(not run yet)" for act in ACTS]
                tests = [paired_runs(found[first], found["granq"]) or "" for first in ("tensor", "channel")]
                lines.append(f"| {arch}{suffixes[arch]} | W{bits}A{bits} | {seed} | " + " | ".join(cells + tests) + " |")
    return lines + [""]


def replace_block(text: str, name: str, lines: Sequence[str]) -> str:
    """``text`` with the lines between ``<!-- networks_report:NAME:begin -->`` and its ``end`` marker
    replaced by ``lines``; ``ValueError`` when the markers are missing."""
    begin, end = f"<!-- networks_report:{name}:begin -->", f"<!-- networks_report:{name}:end -->"
    if begin not in text or end not in text:
        raise ValueError(f"the document has no {begin} ... {end} block")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    body = "\n".join(lines).strip("\n")
    return f"{head}{begin}\n{body}\n{end}{tail}"


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=str(REPO / "runs" / "networks"))
    parser.add_argument("--archs", default="mobilenetv2_x0_5,resnet56a,resnet8_tiny")
    parser.add_argument("--bits", default="4,3")
    parser.add_argument("--seeds", default="4:0,1/3:0",
                        help="seeds per bit width, BITS:SEEDS/... (default 4:0,1/3:0), or SEEDS for every width")
    parser.add_argument("--figures", default=None, help="copy the GranQ runs' activation_error.png here")
    parser.add_argument("--suffix", default="",
                        help="run-folder suffix of a variant (e.g. _bnsstd), or ARCH=SUFFIX,... per network")
    parser.add_argument("--export", default=None, help="also copy the finished runs' small files here")
    parser.add_argument("--doc", default=None,
                        help="also rewrite the summary and details blocks of this page (docs/NETWORKS.md)")
    args = parser.parse_args(argv)
    if args.export:
        for folder in export(Path(args.runs), Path(args.export)):
            print(f"exported {folder}")
    figures = Path(args.figures).resolve() if args.figures else None
    archs = args.archs.split(",")
    plan = parse_seeds(args.seeds, [int(b) for b in args.bits.split(",")])
    suffixes = parse_suffixes(args.suffix, archs)
    summary = summary_table(Path(args.runs), archs, plan, suffixes)
    details = []
    for arch in archs:
        for bits, seeds in plan.items():
            if seeds:
                details += report(Path(args.runs), arch, bits, seeds, figures, suffixes[arch])
    if args.doc:
        doc = Path(args.doc)
        doc.write_text(replace_block(replace_block(doc.read_text(), "summary", summary), "details", details))
        print(f"rewrote the summary and details blocks of {doc}")
    lines = ["## Summary: final top-1 (n, 95% interval) and paired tests, fixed / broken (exact McNemar p)", "",
             *summary, *details]
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
