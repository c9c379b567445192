#!/usr/bin/env python
"""The paper's CIFAR-10 schedule on a CPU (issue 19): where each run stands and what it gives.

For each folder of a ``recipes/zsq_cifar.py --preset paper`` run, finished (``results.json``) or in
progress (``checkpoint.pt``), one row: bits and activation ranges, epochs done of the schedule, the
last evaluated top-1 on the test subset with its 95% Wilson interval, the gap to the teacher on the
same images, the paper's Table 3 number, s/iter (median over the QAT epochs run so far), wall hours
and CPU hours (wall x threads), and the machines with the dates each session started on them.

Each ``--short`` run (the recipe's default short schedule) is paired with the paper-schedule run
of the same bits and activation ranges: an exact McNemar test on the same images (fixed = wrong
after the short schedule and right after the paper's; broken = the reverse), on the paper run's
last evaluation (its final one once finished).

    python benchmarks/paper_schedule_report.py runs/paper_w3a3 runs/paper_w4a4 \\
        --short runs/short_w3a3 docs/evidence/gamma/gamma1_seed0 --figure docs/figures/paper_schedule.png

``--figure``: the accuracy curves over the epochs from the pre-QAT accuracy at epoch 0 (teacher
dashed, the paper's numbers dotted, the paired short-schedule finals dash-dotted) and, below, the
student-teacher agreement and the teacher's accuracy on the generated images per epoch, and the
generator's BN-statistics loss.
The table's "best on test" column is the best evaluated epoch picked on the test images (the
official code's "best"), labelled as such; the final epoch is the result.
``--export DIR``: each run's small files (config, metrics, RESUME.txt, results and the last
per-image correctness); with ``--carry`` also ``checkpoint.pt`` of runs still in progress, so that a
session whose disk does not survive can hand the run on (``recipes/zsq_cifar.py --resume --out``
on a copy of the exported folder).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Paper, Table 3, ResNet-20 (FP 93.89): GranQ top-1 on the full CIFAR-10 test set, its schedule.
PAPER_TABLE3 = {("cifar10", 3, 3, "granq"): 91.37, ("cifar10", 4, 4, "granq"): 93.52}
PAPER_FP = {"cifar10": 93.89}
SMALL_FILES = ("config.json", "metrics.jsonl", "RESUME.txt", "results.json", "per_image.json")


def read_run(folder: Path) -> Dict[str, object]:
    """What the report needs of one run folder, from ``results.json`` when the run finished, else
    from ``checkpoint.pt``; ``ValueError`` when the folder holds neither."""
    folder = Path(folder)
    config_file = folder / "config.json"
    meta = json.loads(config_file.read_text()) if config_file.is_file() else {}
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (folder / "metrics.jsonl").is_file() else []
    if (folder / "results.json").is_file():
        results = json.loads((folder / "results.json").read_text())
        per_image = None
        if (folder / "per_image.json").is_file():
            per_image = json.loads((folder / "per_image.json").read_text())
        elif (folder / "checkpoint.pt").is_file():
            per_image = _last_per_image(_checkpoint(folder))
        n, correct = results["n_test"], results["correct"]
        return _run(folder, True, results["config"],
                    results.get("run_info", {}).get("dataset", meta.get("run_info", {}).get("dataset")),
                    results["epochs_completed"], history, teacher=correct["teacher"], pre_qat=correct.get("pre_qat"),
                    n=n, last=(correct["final"], results["epochs_completed"], per_image),
                    elapsed_s=results.get("wall_time_s"), machines=results.get("machines", []),
                    sessions=results.get("sessions", []))
    if not (folder / "checkpoint.pt").is_file():
        raise ValueError(f"{folder} holds no run (neither results.json nor checkpoint.pt)")
    checkpoint = _checkpoint(folder)
    history = checkpoint["history"] or history
    last = checkpoint.get("last")
    evaluated = [row["epoch"] for row in history if row.get("test_acc") is not None]
    return _run(folder, False, checkpoint["config"], checkpoint.get("run_info", {}).get("dataset"),
                checkpoint["epoch"], history, teacher=checkpoint["teacher"]["correct"],
                pre_qat=(checkpoint.get("pre_qat") or {}).get("correct"), n=checkpoint["teacher"]["n"],
                last=None if last is None else (last["correct"], evaluated[-1] if evaluated else None,
                                                _last_per_image(checkpoint)),
                elapsed_s=checkpoint.get("elapsed_s"), machines=checkpoint.get("machines", []),
                sessions=checkpoint.get("sessions", []))


def _run(folder: Path, finished: bool, config: Dict[str, object], dataset: Optional[str], epoch: int,
         history: List[Dict[str, object]], *, teacher: int, pre_qat: Optional[int], n: int,
         last: Optional[tuple], elapsed_s: Optional[float], machines: List[Dict[str, object]],
         sessions: List[Dict[str, object]] = ()) -> Dict[str, object]:
    """One run's record; ``last`` = (correct, epoch, per-image correctness) of its last evaluation;
    ``sessions``: each start of the run (recorded since 2026-12-03; older runs have none)."""
    return {"folder": str(folder), "finished": finished, "config": config, "dataset": dataset, "epoch": epoch,
            "history": history, "teacher": {"correct": teacher, "n": n}, "pre_qat": {"correct": pre_qat, "n": n},
            "last": None if last is None else {"correct": last[0], "n": n, "epoch": last[1], "per_image": last[2]},
            "elapsed_s": elapsed_s, "machines": machines, "sessions": list(sessions)}


def _checkpoint(folder: Path) -> Dict[str, object]:
    from granq_ao.zsq.checkpoint import load_checkpoint

    return load_checkpoint(folder / "checkpoint.pt")


def _last_per_image(checkpoint: Dict[str, object]) -> Optional[List[int]]:
    from benchmarks.ablation import final_per_image

    return final_per_image(checkpoint)


def key(run: Dict[str, object]) -> tuple:
    """What makes two runs comparable: dataset, bit widths, activation and weight ranges."""
    config = run["config"]
    return (run["dataset"] or "cifar10", config["weight_bits"], config["act_bits"], config["act_granularity"],
            config.get("weight_granularity", "channel"))


def paper_value(run: Dict[str, object]) -> Optional[float]:
    """The paper's Table 3 accuracy for the run's dataset, bits and activation ranges (the paper
    gives one number per row, whatever weight ranges its code used)."""
    return PAPER_TABLE3.get(key(run)[:4])


def label(run: Dict[str, object]) -> str:
    _, wbits, abits, act, weights = key(run)
    return f"W{wbits}A{abits} {act}" + ("" if weights == "channel" else f", {weights} weights")


def threads(run: Dict[str, object]) -> int:
    """The largest OMP thread count any session of the run used (1 when unrecorded)."""
    counts = [int(m["kernels"].get("threads") or 1) for m in run["machines"] if m.get("kernels")]
    return max(counts) if counts else 1


def qat_s_per_iter(run: Dict[str, object]) -> Optional[float]:
    """Median over the QAT epochs run so far of each epoch's s/iter (an epoch slowed by a pause or by
    other work on the machine does not move it much)."""
    import statistics

    values = [row["s_per_iter"] for row in run["history"] if row.get("phase") == "qat" and row.get("s_per_iter")]
    return statistics.median(values) if values else None


def best_on_test(run: Dict[str, object]) -> Optional[tuple]:
    """``(top-1, epoch)`` of the best evaluated epoch (:func:`granq_ao.zsq.results.best_on_test`:
    picked on the test images themselves, as the official code's "best" is)."""
    from granq_ao.zsq.results import best_on_test as best_of

    best = best_of(run["history"])
    return None if best is None else (best["acc"], best["epoch"])


def eta_check(run: Dict[str, object]) -> Optional[Dict[str, object]]:
    """Was the log's ETA right? Over the last uninterrupted stretch of QAT epochs whose metrics rows
    carry ``time`` and ``eta_s`` (consecutive epochs, no gap longer than twice the epoch's training
    and evaluation plus 2 minutes): the ETA after its first epoch minus the ETA after its last one
    (for a finished run: the whole time it predicted) against the wall time that passed between
    them. ``None`` when no such stretch of 2 epochs or more exists."""
    from datetime import datetime

    rows = [row for row in run["history"] if row.get("time") and row.get("eta_s") is not None and row["phase"] == "qat"]
    if len(rows) < 2:
        return None

    def moment(row):
        return datetime.strptime(row["time"], "%Y-%m-%dT%H:%M:%SZ").timestamp()

    first = len(rows) - 1
    while first > 0:
        before, after = rows[first - 1], rows[first]
        limit = 2 * (after["train_time_s"] + (after.get("eval_time_s") or 0.0)) + 120
        if after["epoch"] != before["epoch"] + 1 or moment(after) - moment(before) > limit:
            break
        first -= 1
    start, end = rows[first], rows[-1]
    if start is end:
        return None
    predicted, actual = start["eta_s"] - end["eta_s"], moment(end) - moment(start)
    return {"from_epoch": start["epoch"], "to_epoch": end["epoch"], "from_time": start["time"], "predicted_s": predicted,
            "actual_s": actual, "error": predicted / actual - 1}


def signed_duration(seconds: float) -> str:
    """``format_duration`` with a minus sign for negative durations (an ETA that grew)."""
    from granq_ao.zsq.algorithm import format_duration

    return "-" + format_duration(-seconds) if seconds < 0 else format_duration(seconds)


def accuracy(correct: int, n: int) -> str:
    from granq_ao.zsq.evaluation import wilson_interval

    low, high = wilson_interval(correct, n)
    return f"{100 * correct / n:.2f} [{100 * low:.1f}, {100 * high:.1f}]"


def machines_text(run: Dict[str, object]) -> str:
    parts = []
    for machine in run["machines"]:
        kernels = machine.get("kernels", {})
        parts.append(f"{kernels.get('cpu', '?')} ({kernels.get('aten_capability', '?')}, {kernels.get('threads', '?')} "
                     f"thread) from epoch {machine.get('from_epoch', '?')}, {str(machine.get('date', '?'))[:16]}")
    starts = [f"{str(session.get('date', '?'))[:16]} (from epoch {session.get('from_epoch', '?')})"
              for session in run.get("sessions", [])]
    if starts:
        parts.append("sessions started " + ", ".join(starts))
    return "; ".join(parts) or "(not recorded)"


def report(runs: Sequence[Dict[str, object]], shorts: Sequence[Dict[str, object]]) -> List[str]:
    """The markdown lines: the runs table, then the paired tests."""
    lines = ["| run | epochs done | last top-1 (epoch) | teacher gap | best on test (epoch)* | paper | "
             "s/iter (QAT median) | wall h | CPU h | machines |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        total = run["config"]["epochs"]
        done = f"{run['epoch']} / {total}" + ("" if run["finished"] else " (running)")
        teacher = run["teacher"]
        last = run["last"]
        if last is None:
            top1, gap = "(not evaluated yet)", ""
        else:
            top1 = f"{accuracy(last['correct'], last['n'])} ({last['epoch']})"
            gap = f"{100 * (last['correct'] - teacher['correct']) / last['n']:+.2f}"
        paper = paper_value(run)
        paper_text = "" if paper is None else f"{paper:.2f} (gap {paper - PAPER_FP[key(run)[0]]:+.2f})"
        speed = qat_s_per_iter(run)
        wall = (run["elapsed_s"] or 0.0) / 3600
        best = best_on_test(run)
        best_text = "" if best is None else f"{100 * best[0]:.2f} ({best[1]})"
        lines.append(f"| {label(run)} | {done} | {top1} | {gap} | {best_text} | {paper_text} | "
                     f"{'-' if speed is None else f'{speed:.3f}'} | {wall:.2f} | {wall * threads(run):.2f} | "
                     f"{machines_text(run)} |")
    lines += ["", "*the best of the evaluated epochs, picked on the test images themselves (what the official "
              "code reports as its best accuracy): an optimistic selection, not a held-out estimate."]
    checks = [(run, eta_check(run)) for run in runs]
    if any(check for _, check in checks):
        lines += ["", "| ETA check | after epoch (UTC) | to epoch | ETA then minus ETA there | wall time it took | error |",
                  "|---|---|---|---|---|---|"]
        for run, check in checks:
            if check is not None:
                lines.append(f"| {label(run)} | {check['from_epoch']} ({check['from_time'][:16].replace('T', ' ')}) | "
                             f"{check['to_epoch']} | {signed_duration(check['predicted_s'])} | "
                             f"{signed_duration(check['actual_s'])} "
                             f"| {100 * check['error']:+.1f}% |")
        lines.append("(an ETA assumes the machine stays as busy as it was; a negative 'ETA then minus ETA there': "
                     "the ETA grew, the run slowed down)")
    lines += ["", "| pair (same images) | short -> paper schedule: fixed / broken (p) |", "|---|---|"]
    from benchmarks.ablation import paired

    by_key = {key(run): run for run in runs}
    for short in shorts:
        run = by_key.get(key(short))
        if run is None:
            lines.append(f"| {label(short)} | (no paper-schedule run with these settings) |")
            continue
        a, b = short["last"] and short["last"]["per_image"], run["last"] and run["last"]["per_image"]
        if not a or not b:
            lines.append(f"| {label(short)} | (no per-image results yet) |")
            continue
        test = paired(a, b)
        lines.append(f"| {label(short)}: short {accuracy(short['last']['correct'], short['last']['n'])} -> "
                     f"epoch {run['last']['epoch']} | {test['fixed']} / {test['broken']} "
                     f"(p = {test['mcnemar_exact_p']:.2g}) |")
    return lines


def draw(runs: Sequence[Dict[str, object]], path: Path, shorts: Sequence[Dict[str, object]] = ()) -> None:
    """Top: test top-1 over the epochs, one line per run starting at its pre-QAT accuracy (epoch 0);
    the teacher dashed, the paper's numbers dotted, the final accuracy of each short-schedule run of
    the same settings dash-dotted. Middle: on each epoch's generated batches, how often the student's
    prediction agrees with the teacher's, and how often the teacher predicts the label the generator
    was asked for (the adversarial game that drives the student). Bottom: the generator's
    BN-statistics loss (how unlike the teacher's training data its batches are, by that measure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, games, fidelity) = plt.subplots(3, 1, figsize=(7.5, 9.5), sharex=True, height_ratios=(3, 2, 1.3))
    papers_drawn = set()  # one line per paper number, however many runs share it
    for index, run in enumerate(runs):
        color = f"C{index}"
        for metric, style, text in (("gen_student_agree", "-", "student agrees with teacher"),
                                    ("gen_teacher_acc", "--", "teacher predicts the generator's label")):
            values = [(row["epoch"], 100 * row[metric]) for row in run["history"] if row.get(metric) is not None]
            if values:
                games.plot(*zip(*values), color=color, linestyle=style, linewidth=1, label=f"{label(run)}: {text}")
        bns = [(row["epoch"], row["loss_g_bns"]) for row in run["history"] if row.get("loss_g_bns") is not None]
        if bns:
            fidelity.plot(*zip(*bns), color=color, linewidth=1, label=label(run))
        points = [(row["epoch"], 100 * row["test_acc"]) for row in run["history"] if row.get("test_acc") is not None]
        pre = run.get("pre_qat") or {}
        if pre.get("correct") is not None:
            points.insert(0, (0, 100 * pre["correct"] / pre["n"]))
        if points:
            ax.plot(*zip(*points), color=color, marker=".", label=label(run) + ("" if run["finished"] else " (running)"))
        paper = paper_value(run)
        if paper is not None and key(run)[:4] not in papers_drawn:
            papers_drawn.add(key(run)[:4])
            ax.axhline(paper, color=color, linestyle=":", linewidth=1, label=f"paper {label(run)} {paper:.2f}")
        for short in shorts:
            if key(short) == key(run) and short["last"]:
                value = 100 * short["last"]["correct"] / short["last"]["n"]
                ax.axhline(value, color=color, linestyle="-.", linewidth=1,
                           label=f"short schedule {label(short)} {value:.2f}")
    if runs:
        teacher = runs[0]["teacher"]
        ax.axhline(100 * teacher["correct"] / teacher["n"], color="black", linestyle="--", linewidth=1,
                   label=f"our teacher {100 * teacher['correct'] / teacher['n']:.2f}")
        ax.set_xlim(0, max(run["config"]["epochs"] for run in runs))
    fidelity.set_xlabel("epoch (200 iterations at batch 16 each)")
    fidelity.set_ylabel("BN-statistics loss")
    fidelity.set_title("the generator's BN-statistics loss, epoch mean (lower: closer to the teacher's "
                       "running statistics)", fontsize=9)
    fidelity.grid(alpha=0.3)
    games.set_ylabel("on generated images (%)")
    games.set_title("the generator's images, mean over each epoch's batches", fontsize=9)
    games.grid(alpha=0.3)
    if games.get_legend_handles_labels()[0]:
        games.legend(fontsize=7, loc="lower right")
    ax.set_ylabel("top-1 on the test subset (%)")
    ax.set_title("ResNet-20 CIFAR-10, the paper's schedule on a CPU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def export(folders: Sequence[Path], dest: Path, carry: bool) -> List[Path]:
    """Copy each run's small files (and, with ``carry``, the checkpoint of an unfinished run) to
    ``dest/<folder name>``; the last per-image correctness goes to ``per_image.json``."""
    written = []
    for folder in map(Path, folders):
        run = read_run(folder)
        target = dest / folder.name
        target.mkdir(parents=True, exist_ok=True)
        for name in SMALL_FILES:
            if (folder / name).is_file() and (folder / name).resolve() != (target / name).resolve():
                shutil.copy2(folder / name, target / name)
        if run["last"] and run["last"]["per_image"] is not None and run["finished"]:
            (target / "per_image.json").write_text(json.dumps(run["last"]["per_image"]))
        stale = target / "checkpoint.pt"
        if carry and not run["finished"]:
            if stale.resolve() != (folder / "checkpoint.pt").resolve():
                shutil.copy2(folder / "checkpoint.pt", stale)
        elif stale.is_file() and stale.resolve() != (folder / "checkpoint.pt").resolve():
            stale.unlink()  # a finished run needs no carried checkpoint
        written.append(target)
    return written


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of --preset paper")
    parser.add_argument("--short", nargs="*", type=Path, default=[], help="short-schedule runs to pair with")
    parser.add_argument("--figure", type=Path, help="PNG of the accuracy curves")
    parser.add_argument("--export", type=Path, help="copy each run's small files here")
    parser.add_argument("--carry", action="store_true", help="with --export: also the checkpoints of unfinished runs")
    args = parser.parse_args(argv)
    if args.carry and not args.export:
        parser.error("--carry needs --export DIR")
    try:
        runs = [read_run(folder) for folder in args.runs]
        shorts = [read_run(folder) for folder in args.short]
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    lines = report(runs, shorts)
    print("\n".join(lines))
    if args.figure:
        draw(runs, args.figure, shorts)
        print(f"figure: {args.figure}")
    if args.export:
        for target in export(args.runs, args.export, args.carry):
            print(f"exported: {target}")
    return lines


if __name__ == "__main__":
    main()
