"""The cheapest faithful iteration for the paper's CIFAR-10 schedule on a CPU, measured side by side.

Each candidate is ``recipes/zsq_cifar.py`` itself in a subprocess (CIFAR-10 ResNet-20, the paper
preset's batch 16 and learning rates, W``--bits``A``--bits``), ``--iters`` QAT iterations, no
warm-up, no pictures; its seconds per iteration are the training time of that epoch
(``metrics.jsonl``: ``s_per_iter``, evaluation excluded). The candidates run **alternately**,
``--rounds`` times each, so that load from other processes hits them alike; the table gives the
median and the range over rounds, and the ratio to ``default``.

=================  ===========================================================================
default            1 process x 2 threads, divide-then-BN conv-BN (the recipe's default)
fold_bn            ``--fold-bn``: frozen conv-BN as ``conv(x, fq(w * sf), folded bias)``
torchrun           ``torchrun --nproc_per_node=2``, 1 thread each, same global batch (2 x 8)
fold_bn_torchrun   both
two_runs_1thread   two default runs at once, 1 thread each (e.g. the W3A3 and the W4A4 paper run
                   side by side); its s/iter is each run's, halved: the machine's cost per
                   iteration when it carries two runs
=================  ===========================================================================

Evaluation (the 1017-image subset, student in eval mode) is timed separately in this process;
``--eval-every N`` saves ``(1 - 1/N)`` of it per epoch. The projection for the paper schedule
(200 epochs x 200 iterations, 4 warm-up epochs train the generator only and cost about the same per
iteration here) is ``40,000 x s/iter + evaluations x eval time``.

    python benchmarks/paper_iteration.py --rounds 3 --iters 40 --json runs/paper_iteration.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.harness import write_json  # noqa: E402

RECIPE = REPO / "recipes" / "zsq_cifar.py"
CANDIDATES = ("default", "fold_bn", "torchrun", "fold_bn_torchrun", "two_runs_1thread")


def command(candidate: str, out: Path, args: argparse.Namespace) -> List[str]:
    flags = ["--preset", "paper", "--epochs", "1", "--iters-per-epoch", str(args.iters), "--warmup-epochs", "0",
             "--lr-milestones", "--weight-bits", str(args.bits), "--act-bits", str(args.bits), "--no-pictures",
             "--no-tensorboard", "--seed", "0", "--out", str(out)]
    if "fold_bn" in candidate:
        flags.append("--fold-bn")
    if "torchrun" in candidate:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        return [torchrun, "--standalone", "--nproc_per_node=2", str(RECIPE), *flags]
    return [sys.executable, str(RECIPE), *flags]


def run_candidate(candidate: str, args: argparse.Namespace, scratch: Path) -> float:
    """Seconds per training iteration of one short run of ``candidate`` (``two_runs_1thread``: the
    mean of its two simultaneous runs, halved)."""
    copies = 2 if candidate == "two_runs_1thread" else 1
    threads = "1" if "torchrun" in candidate or copies == 2 else str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, OMP_WAIT_POLICY="PASSIVE")
    outs = [scratch / f"{candidate}_{copy}_{time.time_ns()}" for copy in range(copies)]
    base = "default" if copies == 2 else candidate
    processes = [subprocess.Popen(command(base, out, args), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for out in outs]
    errors = [process.communicate()[1] for process in processes]
    for process, error in zip(processes, errors):
        if process.returncode != 0:
            raise RuntimeError(f"{candidate} failed:\n{error[-2000:]}")
    per_run = [float(json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["s_per_iter"]) for out in outs]
    for out in outs:
        shutil.rmtree(out, ignore_errors=True)
    return statistics.mean(per_run) / copies


def evaluation_seconds(args: argparse.Namespace) -> float:
    """Wall time of one evaluation of the W-bit student on the subset (as the trainer does it)."""
    import torch

    from granq_ao.config import GranQScheme
    from granq_ao.zsq.data import load_cifar_test
    from granq_ao.zsq.evaluation import evaluate_accuracy
    from granq_ao.zsq.student import build_student
    from granq_ao.zsq.teachers import build_cifar_teacher

    torch.set_num_threads(args.threads)
    teacher, _ = build_cifar_teacher("cifar10", allow_download=False)
    scheme = GranQScheme.from_kwargs(args.bits, args.bits, act_placement="paper", fused="eager")
    student = build_student("fx", teacher, scheme, (torch.zeros(2, 3, 32, 32),))
    evalset = load_cifar_test("cifar10")
    evaluate_accuracy(student, evalset, batch_size=256)  # warm
    start = time.perf_counter()
    evaluate_accuracy(student, evalset, batch_size=256)
    return time.perf_counter() - start


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="threads of the one-process candidates")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    candidates = [c for c in args.candidates.split(",") if c]
    unknown = [c for c in candidates if c not in CANDIDATES]
    if unknown:
        parser.error(f"unknown candidates {unknown}; choose from {', '.join(CANDIDATES)}")
    load = os.getloadavg()
    print(f"# {args.rounds} alternating rounds x {args.iters} iterations, W{args.bits}A{args.bits}, batch 16; "
          f"load average {load[0]:.2f} at start; {time.strftime('%Y-%m-%d %H:%M:%S')}")
    times: Dict[str, List[float]] = {c: [] for c in candidates}
    with tempfile.TemporaryDirectory(prefix="paper_iteration_") as scratch:
        for round_index in range(args.rounds):
            for candidate in candidates:
                times[candidate].append(run_candidate(candidate, args, Path(scratch)))
                print(f"round {round_index + 1}: {candidate:<17} {times[candidate][-1]:.3f} s/iter", flush=True)
    evaluation = evaluation_seconds(args)
    medians = {c: statistics.median(v) for c, v in times.items()}
    base = medians.get("default", next(iter(medians.values())))
    print("\n| candidate | s/iter median | range | vs default | paper schedule (40,000 iterations), h |")
    print("|---|---|---|---|---|")
    for candidate in candidates:
        hours = 40000 * medians[candidate] / 3600
        print(f"| {candidate} | {medians[candidate]:.3f} | {min(times[candidate]):.3f}..{max(times[candidate]):.3f} | "
              f"{medians[candidate] / base:.2f}x | {hours:.2f} |")
    print(f"\none evaluation of the subset: {evaluation:.1f} s; 200 evaluations add {200 * evaluation / 3600:.2f} h, "
          f"--eval-every 10 adds {20 * evaluation / 3600:.2f} h")
    summary = {"args": vars(args), "load_average_start": load, "s_per_iter": times, "median": medians,
               "evaluation_s": evaluation, "date": time.strftime("%Y-%m-%d")}
    if args.json:
        write_json(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
