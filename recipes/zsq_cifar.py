#!/usr/bin/env python
"""Zero-shot GranQ quantization of a CIFAR ResNet-20 (no training data: a generator synthesizes it).

    python recipes/zsq_cifar.py                          # short CPU run: CIFAR-10, W4A4, GranQ (~10 min, 2 cores)
    python recipes/zsq_cifar.py --preset paper --dataset cifar100 --wbits 3 --abits 3   # the paper's schedule (GPU)
    torchrun --nproc_per_node=2 recipes/zsq_cifar.py ...  # data parallel (gloo on CPU, nccl on GPU)
    python recipes/zsq_cifar.py --resume --out DIR        # continue an interrupted run

Prints the teacher's accuracy, the quantized student's before QAT and after the final epoch on
real CIFAR test images, each with a 95% Wilson interval and the number of images. See docs/ZSQ.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# OpenMP threads that spin while waiting are catastrophic on a busy machine (measured: ResNet-20
# forward 30x slower with 2 threads when another process holds a core). Sleeping waits cost
# little here. Must be set before torch loads OpenMP; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from granq_ao.config import (ACT_GRANULARITIES, FUSED_MODES, MAX_BITS, MIN_BITS, PLACEMENTS,  # noqa: E402
                             WEIGHT_GRANULARITIES)
from granq_ao.zsq.data import DATASETS, DataNotFoundError  # noqa: E402
from granq_ao.zsq.losses import STUDENT_LOSSES  # noqa: E402
from granq_ao.zsq.teachers import TeacherError  # noqa: E402
from granq_ao.zsq.trainer import (CHECKPOINT_NAME, RESUMABLE_CHANGES,  # noqa: E402
                                  DistributedContext, ZSQConfig, ZSQTrainer, format_accuracy)

# CLI flag -> ZSQConfig field
FLAG_FIELDS = {
    "dataset": "dataset", "wbits": "weight_bits", "abits": "act_bits", "act_granularity": "act_granularity",
    "weight_granularity": "weight_granularity", "act_placement": "act_placement", "epochs": "epochs",
    "iters": "iters_per_epoch", "batch_size": "batch_size", "warmup_epochs": "warmup_epochs", "lr": "lr",
    "lr_g": "lr_generator", "lr_milestones": "lr_milestones", "temperature": "temperature",
    "loss": "student_loss", "seed": "seed", "eval_batch_size": "eval_batch_size",
    "teacher_weights": "teacher_weights", "data_root": "data_root", "download": "download",
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show ``(default: X)`` only for flags whose default is a value (None = preset decides)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def preset_values(preset: str, dataset: str) -> dict:
    """Config fields a preset sets (explicit flags override them)."""
    if preset == "paper":
        # GranQ / AdaDFQ: 200 epochs x 200 iterations, batch 200 (CIFAR-100) / 16 (CIFAR-10),
        # lr 1e-4 (student) and 1e-3 (generator) x0.1 at epoch 100, 4 generator-only warm-up epochs.
        return dict(epochs=200, iters_per_epoch=200, batch_size=200 if dataset == "cifar100" else 16,
                    warmup_epochs=4, lr=1e-4, lr_generator=1e-3, lr_milestones=(100,))
    # default: a short run that fits ~10 minutes on a 2-core CPU (see docs/ZSQ.md for the timing).
    return dict(epochs=DEFAULT_EPOCHS, iters_per_epoch=DEFAULT_ITERS, batch_size=DEFAULT_BATCH,
                warmup_epochs=DEFAULT_WARMUP, lr=DEFAULT_LR, lr_generator=1e-3, lr_milestones=DEFAULT_MILESTONES)


# The paper's schedule compressed ~40x: 10 epochs x 100 iterations at the paper's CIFAR-10 batch
# (16), same learning rates, decay at half time, 1 generator-only warm-up epoch. About 8 minutes
# on 2 quiet CPU cores (docs/ZSQ.md). A 10x larger student lr (1e-3) destroys the student.
DEFAULT_EPOCHS = 10
DEFAULT_ITERS = 100
DEFAULT_BATCH = 16
DEFAULT_WARMUP = 1
DEFAULT_LR = 1e-4
DEFAULT_MILESTONES = (5,)


def bits(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {text!r}") from None
    if not MIN_BITS <= value <= MAX_BITS:
        raise argparse.ArgumentTypeError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {value}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Zero-shot GranQ QAT of a CIFAR ResNet-20 teacher (AdaDFQ generator game, torch.ao QAT student).",
        formatter_class=_HelpFormatter)
    # Every training flag defaults to None = "the preset's value" (or the checkpoint's with --resume).
    add = parser.add_argument
    add("--preset", choices=("default", "paper"), default="default",
        help="default: short CPU run (~10 min on 2 cores); paper: the paper's 200x200 schedule (GPU)")
    add("--dataset", choices=DATASETS, default=None, help="(default cifar10)")
    add("--wbits", type=bits, default=None, help="weight bits, 2..8 (default 4)")
    add("--abits", type=bits, default=None, help="activation bits, 2..8 (default 4)")
    add("--act-granularity", choices=ACT_GRANULARITIES, default=None, help="activation ranges (default granq)")
    add("--weight-granularity", choices=WEIGHT_GRANULARITIES, default=None,
        help="weight ranges: channel = per output channel (default); kernel = per (out, in) slice (official code)")
    add("--act-placement", choices=PLACEMENTS, default=None,
        help="paper: activations quantized after ReLU only (default); all: torch.ao's placement")
    add("--epochs", type=positive_int, default=None)
    add("--iters", type=positive_int, default=None, help="iterations per epoch")
    add("--batch-size", type=positive_int, default=None, help="synthetic images per iteration (all processes)")
    add("--warmup-epochs", type=non_negative_int, default=None, help="epochs that train the generator only")
    add("--lr", type=positive_float, default=None, help="student SGD learning rate")
    add("--lr-g", type=positive_float, default=None, help="generator Adam learning rate")
    add("--lr-milestones", type=non_negative_int, nargs="*", default=None,
        help="epochs (0-based) at which both learning rates are multiplied by 0.1")
    add("--temperature", type=positive_float, default=None, help="student-loss temperature (default 20)")
    add("--loss", choices=STUDENT_LOSSES, default=None,
        help="student loss: entropy = GranQ/AdaDFQ -T^2 H(softmax((t-s)/T)); kl = T^2 KL distillation")
    add("--seed", type=int, default=None, help="(default 0)")
    add("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    add("--out", default=None, help="output folder (default runs/zsq_<dataset>_w<W>a<A>_<granularity>_<time>)")
    add("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add("--data-root", default=None,
        help="folder with the full CIFAR test set in torchvision's layout (default: the offline subset)")
    add("--download", action="store_true", default=None, help="download the CIFAR test set into --data-root")
    add("--teacher-weights", default=None,
        help="teacher state dict (default ../shared/data/weights/resnet20_<dataset>.pth, else pytorchcv download)")
    add("--eval-batch-size", type=positive_int, default=None, help="(default 256)")
    add("--fused", choices=FUSED_MODES, default=None,
        help="fake-quant path: compiled = torch.compile'd, eager = plain ops (same numbers), auto = compiled "
             "where torch.compile works. Default: compiled on CUDA, eager on CPU (compiling costs more than it "
             "saves for a short ResNet-20 run on CPU)")
    add("--no-tensorboard", action="store_true", help="do not write TensorBoard logs")
    return parser


def resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ZSQConfig:
    explicit = {field: getattr(args, flag) for flag, field in FLAG_FIELDS.items() if getattr(args, flag) is not None}
    if "lr_milestones" in explicit:
        explicit["lr_milestones"] = tuple(explicit["lr_milestones"])
    if args.resume:
        checkpoint_path = Path(args.out) / CHECKPOINT_NAME
        if not checkpoint_path.is_file():
            parser.error(f"--resume: no checkpoint at {checkpoint_path}")
        saved = torch.load(checkpoint_path, map_location="cpu", weights_only=True)["config"]
        values = dict(saved)
        conflicts = [f"--{flag.replace('_', '-')} {explicit[field]!r} (run has {saved.get(field)!r})"
                     for flag, field in FLAG_FIELDS.items()
                     if field in explicit and field not in RESUMABLE_CHANGES
                     and _normalized(explicit[field]) != _normalized(saved.get(field))]
        if conflicts:
            parser.error("--resume continues the run as it was configured; these flags differ: " + ", ".join(conflicts))
        values.update(explicit)
        return ZSQConfig.from_dict(values)
    dataset = explicit.get("dataset", "cifar10")
    values = {**preset_values(args.preset, dataset), **explicit}
    return ZSQConfig(**values)


def _normalized(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def default_out(config: ZSQConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return REPO / "runs" / (f"zsq_{config.dataset}_w{config.weight_bits}a{config.act_bits}_"
                            f"{config.act_granularity}_{stamp}")


def summary_block(results: dict) -> str:
    config = results["config"]
    tag = f"W{config['weight_bits']}A{config['act_bits']}"
    entries = {
        "teacher": {"acc": results["teacher_acc"], "n": results["n_test"], "ci95": results["intervals"]["teacher"]},
        f"{tag} pre-QAT": {"acc": results["pre_qat_acc"], "n": results["n_test"], "ci95": results["intervals"]["pre_qat"]},
        f"{tag} final": {"acc": results["final_acc"], "n": results["n_test"], "ci95": results["intervals"]["final"]},
    }
    width = max(len(name) for name in entries)
    lines = [f"{name:<{width}} : {format_accuracy(entry)}" for name, entry in entries.items()]
    paired = results["final_vs_pre_qat"]
    lines.append(f"final vs pre-QAT on the same images: {paired['fixed']} fixed, {paired['broken']} broken "
                 f"(exact McNemar p = {paired['mcnemar_exact_p']:.3g})")
    best = results["best_on_test"]
    lines.append(f"(95% Wilson intervals, percentage points; final = epoch {results['epochs_completed']}; "
                 f"best epoch on test = {100 * best['acc']:.2f}% at epoch {best['epoch']}, test-set selection)")
    lines.append(f"(act {config['act_granularity']}, weights {config['weight_granularity']}, "
                 f"{results['wall_time_s'] / 60:.1f} min, {results['mean_s_per_iter']:.2f} s/iter, "
                 f"images: {results['eval_source']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and args.out is None:
        parser.error("--resume needs --out DIR (the folder of the run to continue)")
    if args.download and args.data_root is None:
        parser.error("--download needs --data-root DIR (where to put the CIFAR test set)")
    try:
        config = resolve_config(args, parser).validate()
    except ValueError as error:
        parser.error(str(error))
    out = Path(args.out) if args.out is not None else default_out(config)
    try:
        context = DistributedContext.from_env(args.device)
    except (ValueError, RuntimeError) as error:
        parser.error(f"--device {args.device}: {error}")
    try:
        try:
            fused = args.fused or ("compiled" if context.device.type == "cuda" else "eager")
            trainer = ZSQTrainer(config, out, context=context, resume=args.resume,
                                 tensorboard=not args.no_tensorboard, fused=fused)
        except (TeacherError, DataNotFoundError, FileExistsError, FileNotFoundError, ValueError) as error:
            parser.error(str(error))
        if context.is_main:
            print(f"output   : {out}")
            if args.preset == "paper" and context.device.type == "cpu":
                print("warning  : --preset paper is 40,000 iterations: days on a CPU (meant for a GPU)")
        try:
            results = trainer.run()
        except KeyboardInterrupt:
            if context.is_main:
                print(f"\ninterrupted during epoch {trainer.state['epoch'] + 1}; the checkpoint after epoch "
                      f"{trainer.state['epoch']} is in {out}. Continue with:\n  python {sys.argv[0]} --resume --out {out}",
                      file=sys.stderr)
            return 130
        if context.is_main:
            print()
            print(summary_block(results))
            print(f"results  : {out / 'results.json'}")
        return 0
    finally:
        context.close()


if __name__ == "__main__":
    sys.exit(main())
