#!/usr/bin/env python
"""A slice of ``recipes/zsq_cifar.py --preset paper``: s/iter, peak memory and the projected time of a
Table 3 row (200 epochs x 200 iterations + 200 evaluations), without running the whole schedule.

For each requested row (CIFAR-10 batch 16 / CIFAR-100 batch 200, the paper preset's batches; W/A bits;
activation method; ``fold_bn`` off and/or on) it builds the recipe's trainer on ``--device`` (teacher
and real test subset from ``../shared/data``), runs ``--warmup`` untimed iterations, then ``--iters``
timed ``train_step`` calls (synchronized on CUDA), then one evaluation of the student on the test
subset (timed). Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA (reset after warm-up),
not measured on CPU.

    python benchmarks/paper_slice.py --device cuda --json runs/gpu/paper_slice.json
    python benchmarks/paper_slice.py --device cpu --rows cifar10 --iters 2 --warmup 1 --batch-override 4

Projection per row: ``epochs * iters_per_epoch * s_per_iter + epochs * eval_s`` with the paper's
200 x 200 (printed in hours). It assumes the timed iterations are representative (no thermal or
load drift) and ignores checkpoint writing.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.harness import environment, synchronize, write_json  # noqa: E402
from granq_ao.zsq.data import NUM_CLASSES, load_cifar_test  # noqa: E402
from granq_ao.zsq.distributed import DistributedContext  # noqa: E402
from granq_ao.zsq.teachers import build_cifar_teacher  # noqa: E402
from granq_ao.zsq.trainer import ZSQConfig, ZSQTrainer  # noqa: E402

PAPER_BATCH = {"cifar10": 16, "cifar100": 200}
PAPER_EPOCHS, PAPER_ITERS = 200, 200


def measure_row(dataset: str, bits: int, act: str, fold_bn: bool, device: str, iters: int, warmup: int,
                batch: Optional[int], fused: str) -> Dict[str, object]:
    context = DistributedContext.from_env(device)
    torch.manual_seed(0)
    teacher, _ = build_cifar_teacher(dataset, allow_download=False)
    config = ZSQConfig(weight_bits=bits, act_bits=bits, act_granularity=act, batch_size=batch or PAPER_BATCH[dataset],
                       epochs=PAPER_EPOCHS, iters_per_epoch=PAPER_ITERS, warmup_epochs=4, fold_bn=fold_bn)
    trainer = ZSQTrainer(config, teacher, None, num_classes=NUM_CLASSES[dataset], eval_data=load_cifar_test(dataset),
                         context=context, tensorboard=False, progress=False, log=lambda _: None, fused=fused)
    dev = trainer.device
    sampler = torch.Generator(device=dev).manual_seed(0)
    trainer.generator.train()
    trainer.student.eval()
    start = time.perf_counter()
    for _ in range(warmup):
        trainer.train_step(sampler, train_student=True)
    synchronize(dev)
    warmup_s = time.perf_counter() - start
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    times: List[float] = []
    for _ in range(iters):
        synchronize(dev)
        start = time.perf_counter()
        trainer.train_step(sampler, train_student=True)
        synchronize(dev)
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20 if dev.type == "cuda" else None
    start = time.perf_counter()
    accuracy = trainer.evaluate(trainer.student)
    synchronize(dev)
    eval_s = time.perf_counter() - start
    times.sort()
    s_per_iter = times[len(times) // 2]
    projected_h = (PAPER_EPOCHS * PAPER_ITERS * s_per_iter + PAPER_EPOCHS * eval_s) / 3600
    return {"dataset": dataset, "bits": bits, "act": act, "fold_bn": fold_bn, "batch": config.batch_size,
            "device": str(dev), "fused": fused, "warmup_iters": warmup, "warmup_s": warmup_s, "iters": iters,
            "s_per_iter_median": s_per_iter, "s_per_iter_min": times[0], "peak_step_mib": peak,
            "eval_s": eval_s, "eval_images": accuracy["n"] if accuracy else None,
            "projected_paper_row_hours": projected_h}


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", default="cifar10,cifar100")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--act", default="granq")
    parser.add_argument("--fold-bn", default="off,on", help="off, on or off,on")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-override", type=int, default=None, help="(tests) instead of the paper's batch")
    parser.add_argument("--fused", default=None, help="fake-quant path (default: compiled on CUDA, eager on CPU)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    fused = args.fused or ("compiled" if args.device.startswith("cuda") else "eager")
    rows = []
    for dataset in [d for d in args.rows.split(",") if d]:
        for fold in [f for f in args.fold_bn.split(",") if f]:
            row = measure_row(dataset, args.bits, args.act, fold == "on", args.device, args.iters, args.warmup,
                              args.batch_override, fused)
            rows.append(row)
            peak = f"{row['peak_step_mib']:.0f} MiB" if row["peak_step_mib"] is not None else "n/a (CPU)"
            print(f"{dataset} W{args.bits}A{args.bits} {args.act} batch {row['batch']} fold_bn {fold}: "
                  f"{row['s_per_iter_median']:.4f} s/iter (min {row['s_per_iter_min']:.4f}), peak {peak}, "
                  f"eval {row['eval_s']:.2f} s -> paper row ~{row['projected_paper_row_hours']:.2f} h", flush=True)
    if args.json:
        write_json(args.json, {"environment": environment(torch.device(args.device)), "rows": rows})
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
