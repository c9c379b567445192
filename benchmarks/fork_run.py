#!/usr/bin/env python
"""What-if from a checkpoint: continue a ``recipes/zsq_cifar.py`` run for a few epochs with one part
of the zero-shot game changed, beside the run itself, and compare.

The run's ``checkpoint.pt`` is copied into ``--out`` (the run may keep going; it is not touched) and
continued there for ``--epochs`` epochs, evaluated after each, with:

* ``--freeze-generator``: the generator's Adam step skipped (its weights fixed; its BN still
  normalizes each batch with the batch's statistics, as in training): is the student losing
  because the generator moves, or does it lose even against fixed images?
* ``--student-lr-scale S``: the student's learning rate multiplied by ``S``.

Printed, per epoch: test top-1 with its 95% interval, the student-teacher agreement and the
teacher's accuracy on the generated images, the generator's BN-statistics loss; and the base run's
row of the same epoch where it has one. ``--json`` writes the same.

    python benchmarks/fork_run.py runs/paper_w3a3 --freeze-generator --epochs 3 --out runs/fork_w3a3_frozen_g

A diagnostic: the fork is not a run of the recipe (its folder's checkpoint says what it started
from, not what changed).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ROW_KEYS = ("epoch", "test_acc", "test_ci95_low", "test_ci95_high", "gen_student_agree", "gen_teacher_acc", "loss_g_bns")


def fork(run: Path, out: Path, epochs: int, freeze_generator: bool = False, student_lr_scale: float = 1.0,
         teacher_weights: Optional[str] = None, data_root: Optional[str] = None, log=print) -> List[Dict[str, Any]]:
    """Continue a copy of ``run``'s checkpoint in ``out`` for ``epochs`` epochs with the changes
    asked; returns the fork's metrics rows (``ROW_KEYS``) of those epochs. ``teacher_weights`` and
    ``data_root``: as the run was given them (default: the recipe's defaults)."""
    from granq_ao.zsq import ZSQConfig, ZSQTrainer
    from granq_ao.zsq.checkpoint import load_checkpoint
    from granq_ao.zsq.cifar_task import cifar_task

    source = Path(run) / "checkpoint.pt"
    if not source.is_file():
        raise FileNotFoundError(f"{run}: no checkpoint.pt to fork from")
    if Path(out).exists():
        raise FileExistsError(f"--out {out} exists; choose a new folder")
    described = load_checkpoint(source)  # the task first: a missing teacher or test set leaves no folder behind
    info = described.get("run_info", {})
    task = cifar_task(info.get("dataset", "cifar10"), info.get("arch", "resnet20"),
                      ZSQConfig.from_dict(described["config"]).latent_dim,
                      teacher_weights=teacher_weights, data_root=data_root)
    Path(out).mkdir(parents=True)
    shutil.copy2(source, Path(out) / "checkpoint.pt")  # the run may have written a newer epoch meanwhile
    checkpoint = load_checkpoint(Path(out) / "checkpoint.pt")
    config = ZSQConfig.from_dict(checkpoint["config"])
    if checkpoint["epoch"] + epochs > config.epochs:  # a finished run (or one near its end) is extended
        config = ZSQConfig.from_dict({**config.to_dict(), "epochs": checkpoint["epoch"] + epochs})
    trainer = ZSQTrainer(config, task.teacher, out, num_classes=task.num_classes, image_size=task.image_size,
                         eval_data=task.eval_data, normalize=task.normalize, generator=task.generator,
                         run_info=task.run_info, resume=True, tensorboard=False, pictures=False, progress=False,
                         fused="eager", seed_rng=False, eval_every=1, log=log)
    algorithm = trainer.algorithm
    if freeze_generator:
        algorithm.optimizer_g.step = lambda *args, **kwargs: None
    if student_lr_scale != 1.0:
        start_epoch = algorithm.start_epoch

        def scaled_start(epoch):
            lrs = start_epoch(epoch)
            for group in algorithm.optimizer_s.param_groups:
                group["lr"] = lrs[0] * student_lr_scale
            return lrs

        algorithm.start_epoch = scaled_start
    trainer.run(stop_after_epochs=epochs)
    return [{key: row.get(key) for key in ROW_KEYS} for row in trainer.state["history"][-epochs:]]


def base_rows(run: Path, epochs: Sequence[int]) -> Dict[int, Dict[str, Any]]:
    """The base run's metrics rows of ``epochs`` (those it has written so far)."""
    path = Path(run) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return {row["epoch"]: {key: row.get(key) for key in ROW_KEYS} for row in rows if row["epoch"] in set(epochs)}


def table(fork_rows: List[Dict[str, Any]], base: Dict[int, Dict[str, Any]]) -> List[str]:
    def cell(row):
        if row is None:
            return "(not yet)"
        top1 = "-" if row["test_acc"] is None else (f"{100 * row['test_acc']:.2f} [{100 * row['test_ci95_low']:.1f}, "
                                                     f"{100 * row['test_ci95_high']:.1f}]")
        return (f"{top1} | {100 * row['gen_student_agree']:.1f} | {100 * row['gen_teacher_acc']:.1f} | "
                f"{row['loss_g_bns']:.4f}")

    lines = ["| epoch | fork: top-1 | agree | teacher acc | BNS | run: top-1 | agree | teacher acc | BNS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in fork_rows:
        lines.append(f"| {row['epoch']} | {cell(row)} | {cell(base.get(row['epoch'])) if row['epoch'] in base else '(not yet) | | |'} |")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="folder of the run to fork (its checkpoint.pt)")
    parser.add_argument("--out", type=Path, required=True, help="new folder for the fork")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--freeze-generator", action="store_true")
    parser.add_argument("--student-lr-scale", type=float, default=1.0)
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--teacher-weights", help="the teacher's state dict, if the run was given one")
    parser.add_argument("--data-root", help="the full CIFAR test set, if the run was evaluated on it")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if args.student_lr_scale < 0:
        parser.error("--student-lr-scale must be >= 0")
    if not args.freeze_generator and args.student_lr_scale == 1.0:
        parser.error("nothing changed: give --freeze-generator and/or --student-lr-scale")
    try:  # a missing teacher or test set (TeacherError, DataNotFoundError) is one of these too
        rows = fork(args.run, args.out, args.epochs, args.freeze_generator, args.student_lr_scale,
                    teacher_weights=args.teacher_weights, data_root=args.data_root)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    base = base_rows(args.run, [row["epoch"] for row in rows])
    lines = table(rows, base)
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"run": str(args.run), "freeze_generator": args.freeze_generator,
                                         "student_lr_scale": args.student_lr_scale, "fork": rows,
                                         "run_rows": [base.get(row["epoch"]) for row in rows]}, indent=1))
    return lines


if __name__ == "__main__":
    main()
