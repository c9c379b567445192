#!/usr/bin/env python
"""Where one zero-shot QAT iteration spends its time, and what ``fold_bn`` (or NHWC) saves.

Builds the recipe's trainer (``granq_ao.zsq.ZSQTrainer``, ResNet-20 teacher from ``../shared/data``,
no output folder) and

1. **phases**: runs the real iteration (``ZSQAlgorithm.train_step``, the trainer's own) with a
   timer after each of its steps (``granq_ao.zsq.algorithm.PHASES``: generator forward, teacher
   forward with BN-statistics hooks, student forward, generator loss + backward + Adam step,
   student forward on the detached images + loss + backward + SGD step), median over ``--reps``
   iterations, and the evaluation of the student on the real test subset;
2. **operators**: ``torch.profiler`` over one full ``train_step``: the operators with the largest
   self CPU time;
3. **A/B of one variant** (``--compare``: ``fold_bn``, or ``channels_last``: NHWC as on CUDA, forced
   on the CPU to measure it): two trainers with the same seed, the default and the variant, whose
   ``train_step`` calls alternate (A, B, A, B, ...) in this one process, so that machine load hits
   both alike; median and quartiles of s/iter, and the ratio of the medians.

    python benchmarks/profile_iteration.py --dataset cifar100 --bits 3 --batch-size 200 --reps 6
    python benchmarks/profile_iteration.py --dataset cifar10 --bits 4 --batch-size 16 --compare channels_last
    python benchmarks/profile_iteration.py --quick          # batch 8, 2 reps: a smoke run

Timings are wall-clock on whatever the machine is doing: the header prints the load average;
compare the two variants only by their ratio inside one run.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from granq_ao.zsq.data import NUM_CLASSES, load_cifar_test  # noqa: E402
from granq_ao.zsq.algorithm import PHASES  # noqa: E402
from granq_ao.zsq.teachers import CIFAR_TEACHERS, build_cifar_teacher, cifar_teacher, teacher_generator  # noqa: E402
from granq_ao.zsq.trainer import ZSQConfig, ZSQTrainer  # noqa: E402


def build_trainer(dataset: str, bits: int, batch_size: int, act_granularity: str, fold_bn: bool, seed: int,
                  eval_data=None, arch: str = "resnet20", channels_last: bool = False) -> ZSQTrainer:
    """The recipe's trainer for teacher ``arch`` (its generator's output space as the recipe sets it).
    ``channels_last``: teacher, student and generated images in NHWC, as the trainer does on CUDA
    (``RunOptions.channels_last``), forced here on any device to measure it."""
    torch.manual_seed(seed)
    teacher, _ = build_cifar_teacher(dataset, allow_download=False, arch=arch)
    config = ZSQConfig(weight_bits=bits, act_bits=bits, act_granularity=act_granularity, batch_size=batch_size,
                       epochs=1, iters_per_epoch=1, warmup_epochs=0, seed=seed, fold_bn=fold_bn)
    generator = teacher_generator(dataset, arch, config.latent_dim)  # as the recipe builds it
    trainer = ZSQTrainer(config, teacher, None, num_classes=NUM_CLASSES[dataset], eval_data=eval_data,
                         generator=generator, tensorboard=False, progress=False, log=lambda _: None, fused="eager")
    if channels_last:
        trainer.algorithm.options = dataclasses.replace(trainer.algorithm.options, channels_last=True)
        trainer.algorithm.distribute()  # one process: only the NHWC conversion of teacher and student
    trainer.algorithm.start_epoch(0)  # learning rates and train/eval modes of the run's first epoch
    return trainer


def timed_phases(trainer: ZSQTrainer, sampler: torch.Generator) -> Dict[str, float]:
    """One real iteration (``ZSQAlgorithm.train_step``, student trained) with a timer after each of
    its steps (``PHASES``: its ``on_phase`` callback), in seconds."""
    cpu_start = time.process_time()
    marks = {"start": time.perf_counter()}
    trainer.algorithm.train_step(sampler, train_student=True,
                                 on_phase=lambda name: marks.update({name: time.perf_counter()}))
    names = ("start",) + PHASES
    out = {name: marks[name] - marks[names[i]] for i, name in enumerate(PHASES)}
    out["cpu_s"] = time.process_time() - cpu_start  # CPU time of this process (all threads)
    return out


def operator_table(trainer: ZSQTrainer, sampler: torch.Generator, top: int) -> List[Dict[str, object]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_step(sampler, train_student=True)
    rows = []
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    for event in events[:top]:
        rows.append({"op": event.key, "calls": event.count, "self_ms": event.self_cpu_time_total / 1e3,
                     "self_share": event.self_cpu_time_total / total})
    return rows


def quartiles(values: Sequence[float]) -> Dict[str, float]:
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "q1": q[0], "q3": q[2], "min": ordered[0], "n": len(ordered)}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="cifar100", choices=("cifar10", "cifar100"))
    parser.add_argument("--compare", default="fold_bn", choices=("fold_bn", "channels_last"),
                        help="the variant timed against the default, alternating (default fold_bn)")
    parser.add_argument("--arch", default="resnet20", choices=tuple(CIFAR_TEACHERS),
                        help="the teacher (granq_ao.zsq.teachers.CIFAR_TEACHERS; default resnet20)")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--act-granularity", default="granq")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--reps", type=int, default=6, help="timed iterations per variant (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="batch 8, 2 reps, no evaluation timing")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.reps = 8, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "loadavg_start": os.getloadavg(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version(), "cpu_count": os.cpu_count()}
    print(f"profile one iteration: {args.arch} {args.dataset} W{args.bits}A{args.bits} {args.act_granularity}, batch "
          f"{args.batch_size}, {args.reps} reps; threads {env['threads']}, load average {env['loadavg_start']}")
    normalization = cifar_teacher(args.arch, args.dataset).normalization(args.dataset)
    evalset = None if args.quick else load_cifar_test(args.dataset, normalization=normalization)
    variants = ("default", args.compare)
    trainers = {name: build_trainer(args.dataset, args.bits, args.batch_size, args.act_granularity,
                                    name == "fold_bn", 0, evalset, args.arch, channels_last=name == "channels_last")
                for name in variants}
    samplers = {name: torch.Generator().manual_seed(1) for name in variants}

    # 1. phases, 3. A/B (the phase run is the A/B run: alternating default / the variant)
    for name, trainer in trainers.items():  # warm-up
        timed_phases(trainer, samplers[name])
    phases: Dict[str, List[Dict[str, float]]] = {name: [] for name in variants}
    for _ in range(args.reps):
        for name in variants:
            phases[name].append(timed_phases(trainers[name], samplers[name]))
    result: Dict[str, object] = {"environment": env, "settings": vars(args)}
    for name in variants:
        totals = [sum(p[ph] for ph in PHASES) for p in phases[name]]
        result[name] = {"s_per_iter": quartiles(totals), "cpu_s_per_iter": quartiles([p["cpu_s"] for p in phases[name]]),
                        "phases_median_s": {ph: statistics.median(p[ph] for p in phases[name]) for ph in PHASES}}
    other = args.compare
    ratio = result[other]["s_per_iter"]["median"] / result["default"]["s_per_iter"]["median"]
    cpu_ratio = result[other]["cpu_s_per_iter"]["median"] / result["default"]["cpu_s_per_iter"]["median"]
    result[f"{other}_over_default"], result[f"{other}_over_default_cpu"] = ratio, cpu_ratio
    print(f"\nphase medians, s (default | {other}):")
    for ph in PHASES:
        print(f"  {ph:18s} {result['default']['phases_median_s'][ph]:8.4f} | {result[other]['phases_median_s'][ph]:8.4f}")
    for name in variants:
        q = result[name]["s_per_iter"]
        print(f"  {name:18s} s/iter median {q['median']:.4f} [q1 {q['q1']:.4f}, q3 {q['q3']:.4f}, min {q['min']:.4f}] n={q['n']}")
        c = result[name]["cpu_s_per_iter"]
        print(f"  {'':18s} CPU s/iter median {c['median']:.4f} [q1 {c['q1']:.4f}, q3 {c['q3']:.4f}]")
    print(f"  {other} / default (medians): wall {ratio:.3f}, CPU time {cpu_ratio:.3f}")

    # evaluation cost (real subset), once each
    if evalset is not None:
        result["evaluation_s"] = {"images": len(evalset)}
        for name in variants:
            start = time.perf_counter()
            trainers[name].evaluate(trainers[name].student)
            result["evaluation_s"][name] = time.perf_counter() - start
        print(f"  evaluation of the student on {len(evalset)} images: default {result['evaluation_s']['default']:.2f} s, "
              f"{other} {result['evaluation_s'][other]:.2f} s (once each)")

    # 2. operators of one train_step, each variant
    for name in variants:
        result[f"operators_{name}"] = operator_table(trainers[name], samplers[name], args.top)
        print(f"\ntop operators by self CPU time, one train_step ({name}):")
        for row in result[f"operators_{name}"]:
            print(f"  {row['op'][:40]:40s} calls {row['calls']:5d}  self {row['self_ms']:9.2f} ms  "
                  f"{100 * row['self_share']:5.1f}%")
    env["loadavg_end"] = os.getloadavg()
    print(f"\nload average at end {env['loadavg_end']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
