#!/usr/bin/env python
"""Accuracy of the quantized student *before* any QAT step: activation method x weight ranges.

The zero-shot recipe's student (``granq_ao.zsq.student.prepare_student``: torch.ao FX QAT copy of the
teacher, BN frozen, activations quantized after each ReLU) evaluated on the real test subset exactly
as the trainer evaluates it (fixed batches of ``--eval-batch-size``, the recipe's 256), for every
activation method of Table 5 and weight ranges ``channel`` (per output channel, our default) and
``kernel`` (per (out, in) slice, the official code). No training: this isolates what the ranges
alone do, the question of issue 13 ("how much of the paper's gain is the activations and how much
the weight ranges"). Each accuracy has its 95% Wilson interval; paired comparisons (same images)
use the exact McNemar test.

    python benchmarks/pre_qat.py --dataset cifar100 --bits 3
    python benchmarks/pre_qat.py --dataset cifar10 --arch mobilenetv2_x0_5 --bits 4 --acts tensor,channel,granq --weights channel
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from granq_ao.config import GranQScheme  # noqa: E402
from granq_ao.zsq.data import load_cifar_test  # noqa: E402
from granq_ao.zsq.evaluation import accuracy_entry, format_accuracy, mcnemar_exact_p, per_image_correct  # noqa: E402
from granq_ao.zsq.student import prepare_student  # noqa: E402
from granq_ao.zsq.teachers import build_cifar_teacher, cifar_teacher  # noqa: E402

ACTS = ("tensor", "channel", "granq_iterative", "granq")
WEIGHTS = ("channel", "kernel")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="cifar100")
    parser.add_argument("--arch", default="resnet20", help="teacher (recipes/zsq_cifar.py --arch)")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--acts", default=",".join(ACTS))
    parser.add_argument("--weights", default=",".join(WEIGHTS))
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--limit", type=int, default=None, help="first N test images only (tests)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    teacher, source = build_cifar_teacher(args.dataset, allow_download=False, arch=args.arch)
    evalset = load_cifar_test(args.dataset, normalization=cifar_teacher(args.arch, args.dataset).normalization(args.dataset))
    if args.limit:
        evalset.images, evalset.labels = evalset.images[:args.limit], evalset.labels[:args.limit]
    rows, correct = [], {}
    teacher_correct = per_image_correct(teacher, evalset, args.eval_batch_size)
    print(f"teacher {source}: {format_accuracy(accuracy_entry(int(teacher_correct.sum()), len(evalset)))}")
    for weight in [w for w in args.weights.split(",") if w]:
        for act in [a for a in args.acts.split(",") if a]:
            scheme = GranQScheme.from_kwargs(args.bits, args.bits, act, weight, "paper", fused="eager")
            student = prepare_student(teacher, scheme, (torch.zeros(1, 3, 32, 32),))
            hits = per_image_correct(student, evalset, args.eval_batch_size)
            correct[(act, weight)] = hits
            entry = accuracy_entry(int(hits.sum()), len(evalset))
            rows.append({"act": act, "weight": weight, **entry})
            print(f"W{args.bits}A{args.bits} act {act:16s} weights {weight:8s}: {format_accuracy(entry)}", flush=True)
    pairs = []
    for (a, b) in ((("tensor", "channel"), ("granq", "channel")), (("channel", "channel"), ("granq", "channel")),
                   (("granq_iterative", "channel"), ("granq", "channel")), (("granq", "channel"), ("granq", "kernel")),
                   (("tensor", "channel"), ("tensor", "kernel"))):
        if a in correct and b in correct:
            fixed = int(((correct[a] == 0) & (correct[b] == 1)).sum())
            broken = int(((correct[a] == 1) & (correct[b] == 0)).sum())
            pairs.append({"from": a, "to": b, "fixed": fixed, "broken": broken,
                          "mcnemar_exact_p": mcnemar_exact_p(fixed, broken)})
            print(f"  {a} -> {b}: {fixed} fixed, {broken} broken (McNemar p = {mcnemar_exact_p(fixed, broken):.3g})")
    result = {"dataset": args.dataset, "arch": args.arch, "bits": args.bits, "n": len(evalset), "teacher": source,
              "eval_batch_size": args.eval_batch_size, "rows": rows, "paired": pairs,
              "command": "python benchmarks/pre_qat.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
