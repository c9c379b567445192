#!/usr/bin/env python
"""Table 5 of the paper on the recipe's short schedule, plus the weight-range and loss ablations.

Every run is ``recipes/zsq_cifar.py`` in its own subprocess (CIFAR-100 ResNet-20 W3A3 by default,
the recipe's default short schedule unless ``--schedule`` flags say otherwise), one output folder
per (configuration, seed) under ``--out``. Finished runs (``results.json`` present) are skipped, so
the script is resumable: run it again after an interruption and it continues (an interrupted run
with a checkpoint is continued with the recipe's ``--resume``).

Groups (``--groups``; a configuration shared by two groups runs once):

=========  ==============================================================================
act        Table 5: activations ``tensor`` / ``channel`` / ``granq_iterative`` / ``granq``,
           weights per output channel (paper: 49.98 / 51.26 / 62.68 / 62.73, full schedule)
gran       the same without the (slow, prediction-identical) iterative method: ``tensor`` /
           ``channel`` / ``granq``; with ``--arch`` it is the evidence of docs/NETWORKS.md
weight     weight ranges ``channel`` vs ``kernel`` (the official code's per-(out, in) slice),
           each with GranQ and with ``tensor`` activations
loss       Table 4's idea: AdaDFQ's losses (the recipe's: margin generator objective, ``entropy``
           student loss) vs GDFQ's (generator ``CE(y, t) + 0.1 * BNS``, ``kl`` distillation for
           the student), each with GranQ and with ``tensor`` activations
=========  ==============================================================================

Outputs: ``runs.csv`` (one line per run), ``summary.json`` (per configuration: mean, sample standard
deviation, min/max over seeds; paired comparisons), ``ablation.md`` (the tables). Paired comparisons
use the same test images: for each seed, the two configurations' final per-image correctness
(from each run's ``checkpoint.pt``) gives ``fixed``/``broken`` counts and an exact McNemar p
(:func:`granq_ao.zsq.evaluation.mcnemar_exact_p`); the images pooled over seeds are summed too
(each seed is a separate pair of models on the same images, so the pooled counts are a summary,
not one test).

    python benchmarks/ablation.py --dry-run                 # print the commands of the full ablation
    python benchmarks/ablation.py --jobs 2 --threads 1      # the full ablation (hours of CPU)
    python benchmarks/ablation.py --quick --out runs/ablation_quick   # tiny schedule, 2 runs (a smoke test)
    python benchmarks/ablation.py --arch mobilenetv2_x0_5 --dataset cifar10 --bits 4 --groups gran --seeds 0,1 \
        --out runs/networks/mobilenetv2_x0_5_w4a4                       # docs/NETWORKS.md
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RECIPE = REPO / "recipes" / "zsq_cifar.py"
PAPER_TABLE5 = {"tensor": (49.98, 0.24), "channel": (51.26, 0.28), "granq_iterative": (62.68, 0.11),
                "granq": (62.73, 0.17)}


@dataclass(frozen=True)
class Config:
    """One recipe configuration. ``generator="gdfq"`` is GDFQ's generator objective with its BNS
    weight 0.1 (``--generator-loss gdfq --gamma 0.1``); the default is AdaDFQ's (the recipe's)."""

    act: str = "granq"
    weight: str = "channel"
    loss: str = "entropy"
    generator: str = "adadfq"

    @property
    def name(self) -> str:
        suffix = "" if self.generator == "adadfq" else f"_g-{self.generator}"
        return f"a-{self.act}_w-{self.weight}_l-{self.loss}{suffix}"

    def flags(self) -> List[str]:
        flags = ["--act-granularity", self.act, "--weight-granularity", self.weight, "--student-loss", self.loss]
        if self.generator == "gdfq":
            flags += ["--generator-loss", "gdfq", "--gamma", "0.1"]
        return flags


def gdfq_losses(act: str) -> Config:
    """Table 4's GDFQ losses: GDFQ's generator objective and KL distillation for the student."""
    return Config(act=act, loss="kl", generator="gdfq")


GROUPS: Dict[str, List[Tuple[str, Config]]] = {
    "act": [(act, Config(act=act)) for act in ("tensor", "channel", "granq_iterative", "granq")],
    "gran": [(act, Config(act=act)) for act in ("tensor", "channel", "granq")],
    "weight": [(f"act {act}, weights {weight}", Config(act=act, weight=weight))
               for act in ("granq", "tensor") for weight in ("channel", "kernel")],
    "loss": [(f"act {act}, {losses} losses", config) for act in ("granq", "tensor")
             for losses, config in (("AdaDFQ", Config(act=act)), ("GDFQ", gdfq_losses(act)))],
}
# (group, baseline config, compared config): the paired tests printed under each table
PAIRS = {
    "act": [(Config(act="tensor"), Config(act="channel")), (Config(act="channel"), Config(act="granq")),
            (Config(act="tensor"), Config(act="granq")), (Config(act="granq_iterative"), Config(act="granq"))],
    "gran": [(Config(act="tensor"), Config(act="channel")), (Config(act="channel"), Config(act="granq")),
             (Config(act="tensor"), Config(act="granq"))],
    "weight": [(Config(act=a, weight="channel"), Config(act=a, weight="kernel")) for a in ("granq", "tensor")],
    "loss": [(gdfq_losses(a), Config(act=a)) for a in ("granq", "tensor")]
    + [(gdfq_losses("tensor"), gdfq_losses("granq"))],
}
QUICK_SCHEDULE = ["--epochs", "1", "--iters-per-epoch", "2", "--batch-size", "8", "--warmup-epochs", "0",
                  "--eval-batch-size", "512"]


def run_dir(out: Path, config: Config, seed: int) -> Path:
    return out / config.name / f"seed{seed}"


def command(config: Config, seed: int, folder: Path, args: argparse.Namespace, resume: bool) -> List[str]:
    cmd = [sys.executable, str(RECIPE), "--dataset", args.dataset, "--weight-bits", str(args.bits),
           "--act-bits", str(args.bits), *config.flags(), "--seed", str(seed), "--out", str(folder),
           "--no-tensorboard", *args.schedule]
    if args.arch != "resnet20":
        cmd[2:2] = ["--arch", args.arch]
    if args.fold_bn:
        cmd.append("--fold-bn")
    if resume:
        cmd = [sys.executable, str(RECIPE), "--resume", "--out", str(folder), "--no-tensorboard"]
    return cmd


def run_one(config: Config, seed: int, args: argparse.Namespace, log) -> str:
    """Run (or skip, or resume) one configuration and seed; returns what happened."""
    folder = run_dir(Path(args.out), config, seed)
    if (folder / "results.json").is_file():
        return "skipped (finished)"
    resume = (folder / "checkpoint.pt").is_file()
    cmd = command(config, seed, folder, args, resume)
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    log(f"start {config.name} seed {seed}{' (resume)' if resume else ''}")
    start = time.time()
    with open(folder / "run.log", "a") as handle:
        handle.write("$ " + " ".join(cmd) + "\n")
        handle.flush()
        code = subprocess.call(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    status = f"exit {code} after {time.time() - start:.0f} s"
    log(f"done  {config.name} seed {seed}: {status}")
    return status


# ----------------------------------------------------------------------------- collecting
def read_run(folder: Path) -> Optional[Dict[str, object]]:
    """``{"final_acc", "pre_qat_acc", "n_test", "per_image" (final correctness), ...}`` of a finished run."""
    results_path = folder / "results.json"
    if not results_path.is_file():
        return None
    results = json.loads(results_path.read_text())
    row = {"final_acc": results["final_acc"], "pre_qat_acc": results["pre_qat_acc"],
           "teacher_acc": results["teacher_acc"], "n_test": results["n_test"],
           "ci95": results["intervals"]["final"] if results.get("intervals") else None,
           "wall_time_s": results["wall_time_s"], "s_per_iter": results["mean_s_per_iter"], "per_image": None}
    checkpoint = folder / "checkpoint.pt"
    if checkpoint.is_file():
        from granq_ao.zsq.checkpoint import load_checkpoint

        row["per_image"] = final_per_image(load_checkpoint(checkpoint))
    return row


def final_per_image(checkpoint: Dict[str, object]) -> Optional[List[int]]:
    """The last evaluation's per-image correctness (1 = right) held in a run's checkpoint, or None."""
    last = checkpoint.get("last") or {}
    return [int(v) for v in last["per_image"].tolist()] if "per_image" in last else None


def paired(a: Sequence[int], b: Sequence[int]) -> Dict[str, object]:
    """Same images, models a then b: fixed = wrong in a and right in b; broken = the reverse."""
    from granq_ao.zsq.evaluation import mcnemar_exact_p

    if len(a) != len(b):
        raise ValueError("paired comparison needs the same images")
    fixed = sum(1 for x, y in zip(a, b) if x == 0 and y == 1)
    broken = sum(1 for x, y in zip(a, b) if x == 1 and y == 0)
    return {"fixed": fixed, "broken": broken, "mcnemar_exact_p": mcnemar_exact_p(fixed, broken)}


def spread(values: Sequence[float]) -> Dict[str, object]:
    return {"n": len(values), "mean": statistics.mean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values) if values else None, "max": max(values) if values else None}


def summarize(out: Path, groups: Sequence[str], seeds: Sequence[int]) -> Dict[str, object]:
    runs = {}
    for group in groups:
        for _, config in GROUPS[group]:
            for seed in seeds:
                runs[(config, seed)] = read_run(run_dir(out, config, seed))
    summary: Dict[str, object] = {"groups": {}, "seeds": list(seeds)}
    for group in groups:
        rows = []
        for label, config in GROUPS[group]:
            finished = [runs[(config, s)] for s in seeds if runs[(config, s)] is not None]
            entry = {"label": label, "config": config.name, **spread([100 * r["final_acc"] for r in finished]),
                     "pre_qat": spread([100 * r["pre_qat_acc"] for r in finished]),
                     "per_seed": {s: (100 * runs[(config, s)]["final_acc"] if runs[(config, s)] else None)
                                  for s in seeds},
                     "n_test": finished[0]["n_test"] if finished else None}
            if group == "act" and config.act in PAPER_TABLE5:
                entry["paper"] = PAPER_TABLE5[config.act]
            rows.append(entry)
        comparisons = []
        for base, other in PAIRS[group]:
            per_seed, pooled = {}, {"fixed": 0, "broken": 0}
            for s in seeds:
                ra, rb = runs.get((base, s)), runs.get((other, s))
                if ra and rb and ra["per_image"] is not None and rb["per_image"] is not None:
                    p = paired(ra["per_image"], rb["per_image"])
                    per_seed[s] = p
                    pooled["fixed"] += p["fixed"]
                    pooled["broken"] += p["broken"]
            comparisons.append({"baseline": base.name, "compared": other.name, "per_seed": per_seed,
                                "pooled_counts": pooled})
        summary["groups"][group] = {"rows": rows, "paired": comparisons}
    summary["runs"] = [{"config": c.name, "act": c.act, "weight": c.weight, "loss": c.loss, "generator": c.generator,
                        "seed": s,
                        **({k: v for k, v in r.items() if k != "per_image"} if r else {"final_acc": None})}
                       for (c, s), r in runs.items()]
    return summary


def _fmt(value, spec=".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def format_markdown(summary: Dict[str, object]) -> str:
    lines = []
    for group, data in summary["groups"].items():
        lines.append(f"### {group}\n")
        lines.append("| configuration | seeds done | final top-1 mean | std | min..max | pre-QAT mean | per seed | paper |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for row in data["rows"]:
            per_seed = ", ".join(f"{s}: {_fmt(v)}" for s, v in row["per_seed"].items())
            paper = f"{row['paper'][0]:.2f} (+-{row['paper'][1]:.2f})" if row.get("paper") else ""
            lines.append(f"| {row['label']} | {row['n']} | {_fmt(row['mean'])} | {_fmt(row['std'])} | "
                         f"{_fmt(row['min'])}..{_fmt(row['max'])} | {_fmt(row['pre_qat']['mean'])} | {per_seed} | {paper} |")
        lines.append("")
        lines.append("| paired (same images) | per seed: fixed / broken (McNemar p) | pooled fixed / broken |")
        lines.append("|---|---|---|")
        for comp in data["paired"]:
            per_seed = "; ".join(f"seed {s}: {p['fixed']} / {p['broken']} (p={p['mcnemar_exact_p']:.2g})"
                                 for s, p in comp["per_seed"].items()) or "n/a"
            pooled = comp["pooled_counts"]
            lines.append(f"| {comp['baseline']} -> {comp['compared']} | {per_seed} | {pooled['fixed']} / {pooled['broken']} |")
        lines.append("")
    return "\n".join(lines)


def write_outputs(out: Path, summary: Dict[str, object]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "ablation.md").write_text(format_markdown(summary))
    fields = ["config", "act", "weight", "loss", "generator", "seed", "final_acc", "pre_qat_acc", "teacher_acc", "n_test",
              "ci95", "wall_time_s", "s_per_iter"]
    with open(out / "runs.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for run in summary["runs"]:
            writer.writerow({k: run.get(k) for k in fields})


# ----------------------------------------------------------------------------- CLI
def planned(groups: Sequence[str], seeds: Sequence[int]) -> List[Tuple[Config, int]]:
    """Seed-major: every configuration of the first seed, then of the next (an interrupted
    ablation has complete seeds)."""
    seen, plan = set(), []
    for seed in seeds:
        for group in groups:
            for _, config in GROUPS[group]:
                if (config, seed) not in seen:
                    seen.add((config, seed))
                    plan.append((config, seed))
    return plan


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", default="act,weight,loss", help="comma-separated: " + ", ".join(GROUPS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--dataset", default="cifar100")
    parser.add_argument("--arch", default="resnet20", help="teacher (recipes/zsq_cifar.py --arch)")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "runs" / "ablation"))
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--fold-bn", action="store_true", help="pass --fold-bn to every run")
    parser.add_argument("--quick", action="store_true",
                        help="tiny schedule (1 epoch x 2 iterations, batch 8), act group, tensor and granq, seed 0")
    parser.add_argument("--dry-run", action="store_true", help="print the commands; run nothing")
    parser.add_argument("--summarize-only", action="store_true", help="only collect finished runs")
    parser.add_argument("schedule", nargs="*", help="extra recipe flags after --, e.g. -- --epochs 20")
    args = parser.parse_args(argv)
    groups = [g for g in args.groups.split(",") if g]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown groups {unknown}; choose from {', '.join(GROUPS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.quick:
        args.schedule = QUICK_SCHEDULE + list(args.schedule)
        plan = [(Config(act="tensor"), seeds[0]), (Config(act="granq"), seeds[0])]
        groups, seeds = ["act"], seeds[:1]
    else:
        plan = planned(groups, seeds)
    out = Path(args.out)

    def log(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    if args.dry_run:
        for config, seed in plan:
            print(" ".join(command(config, seed, run_dir(out, config, seed), args, resume=False)))
        print(f"# {len(plan)} runs")
        return {"plan": [(c.name, s) for c, s in plan]}
    if not args.summarize_only:
        log(f"{len(plan)} runs, {args.jobs} at a time, OMP_NUM_THREADS={args.threads}, out {out}")
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            statuses = list(pool.map(lambda item: run_one(item[0], item[1], args, log), plan))
        for (config, seed), status in zip(plan, statuses):
            log(f"{config.name} seed {seed}: {status}")
    summary = summarize(out, groups, seeds)
    if args.quick:  # only the two configurations that ran
        rows = summary["groups"]["act"]["rows"]
        summary["groups"]["act"]["rows"] = [r for r in rows if r["config"] in {c.name for c, _ in plan}]
        summary["groups"]["act"]["paired"] = [p for p in summary["groups"]["act"]["paired"]
                                              if {p["baseline"], p["compared"]} <= {c.name for c, _ in plan}]
        summary["runs"] = [r for r in summary["runs"] if r["config"] in {c.name for c, _ in plan}]
    summary["command"] = "python benchmarks/ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_outputs(out, summary)
    print(format_markdown(summary))
    print(f"wrote {out / 'ablation.md'}, {out / 'summary.json'}, {out / 'runs.csv'}")
    return summary


if __name__ == "__main__":
    main()
