#!/usr/bin/env python
"""Zero-shot GranQ quantization of a CIFAR teacher (no training data: a generator synthesizes it).

    python recipes/zsq_cifar.py                          # short CPU run: CIFAR-10 ResNet-20, W4A4, GranQ (~10 min, 2 cores)
    python recipes/zsq_cifar.py --arch mobilenetv2_x0_5  # another teacher (--help lists them)
    python recipes/zsq_cifar.py --preset paper --dataset cifar100 --wbits 3 --abits 3   # the paper's schedule (GPU)
    torchrun --nproc_per_node=2 recipes/zsq_cifar.py ...  # data parallel (gloo on CPU, nccl on GPU)
    python recipes/zsq_cifar.py --resume --out DIR        # continue an interrupted run

Prints the teacher's accuracy, the quantized student's before QAT and after the final epoch on
real CIFAR test images, each with a 95% Wilson interval and the number of images. See docs/ZSQ.md.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# OpenMP threads that spin while waiting are catastrophic on a busy machine (measured: ResNet-20
# forward 30x slower with 2 threads when another process holds a core). Sleeping waits cost
# little here. Must be set before torch loads OpenMP; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from granq_ao.zsq import cli  # noqa: E402
from granq_ao.zsq.cifar_task import cifar_task  # noqa: E402
from granq_ao.zsq.data import DATASETS, DataNotFoundError  # noqa: E402
from granq_ao.zsq.teachers import CIFAR_TEACHERS, TeacherError, cifar_teacher, locate_teacher_weights  # noqa: E402

# The paper's schedule compressed ~40x: 10 epochs x 100 iterations at the paper's CIFAR-10 batch
# (16), same learning rates, decay at half time, 1 generator-only warm-up epoch. About 8 minutes
# on 2 quiet CPU cores (docs/ZSQ.md). A 10x larger student lr (1e-3) destroys the student.
DEFAULT_EPOCHS = 10
DEFAULT_ITERS = 100
DEFAULT_BATCH = 16
DEFAULT_WARMUP = 1
DEFAULT_LR = 1e-4
DEFAULT_MILESTONES = (5,)


def preset_values(args) -> dict:
    """Config fields a preset sets (explicit flags override them)."""
    if args.preset == "paper":
        # GranQ / AdaDFQ: 200 epochs x 200 iterations, batch 200 (CIFAR-100) / 16 (CIFAR-10),
        # lr 1e-4 (student) and 1e-3 (generator) x0.1 at epoch 100, 4 generator-only warm-up epochs.
        return dict(epochs=200, iters_per_epoch=200, batch_size=200 if args.dataset == "cifar100" else 16,
                    warmup_epochs=4, lr=1e-4, lr_generator=1e-3, lr_milestones=(100,))
    return dict(epochs=DEFAULT_EPOCHS, iters_per_epoch=DEFAULT_ITERS, batch_size=DEFAULT_BATCH,
                warmup_epochs=DEFAULT_WARMUP, lr=DEFAULT_LR, lr_generator=1e-3, lr_milestones=DEFAULT_MILESTONES)


def build_parser():
    parser = cli.build_parser(
        "Zero-shot GranQ QAT of a CIFAR teacher (AdaDFQ generator game, GranQ student).",
        {"default": "short CPU run (~10 min on 2 cores)", "paper": "the paper's 200x200 schedule (GPU)"})
    add = parser.add_argument
    add("--dataset", choices=DATASETS, default=None, help="(default cifar10; with --resume the run's)")
    add("--arch", choices=tuple(CIFAR_TEACHERS), default=None, metavar="ARCH",
        help="teacher architecture (default resnet20; with --resume the run's): "
             + "; ".join(f"{name} = {spec.description} ({'/'.join(spec.files)})" for name, spec in CIFAR_TEACHERS.items()))
    add("--teacher-weights", default=None,
        help="teacher state dict (default ../shared/data/weights/<the arch's file>, else its public download)")
    add("--data-root", default=None,
        help="folder with the full CIFAR test set in torchvision's layout (default: the offline subset)")
    add("--download", action="store_true", help="download the CIFAR test set into --data-root")
    return parser


def check_args(args, parser) -> None:
    if args.download and args.data_root is None:
        parser.error("--download needs --data-root DIR (where to put the CIFAR test set)")
    # A resumed run keeps its dataset and teacher; a new one is CIFAR-10 ResNet-20 by default.
    saved = cli.saved_run_info(args, parser) if args.resume and None in (args.dataset, args.arch) else {}
    if args.dataset is None:
        args.dataset = saved.get("dataset", "cifar10")
    if args.arch is None:
        args.arch = saved.get("arch", "resnet20")
    try:  # the pairing and the weights file, before any work
        cifar_teacher(args.arch, args.dataset)
        locate_teacher_weights(args.dataset, args.teacher_weights, arch=args.arch)
    except TeacherError as error:
        parser.error(f"--arch {args.arch}: {error}")


def build_task(args, config, context) -> cli.Task:
    return cifar_task(args.dataset, args.arch, config.latent_dim, teacher_weights=args.teacher_weights,
                      data_root=args.data_root, download=args.download)


def default_out(args, config) -> Path:
    prefix = f"zsq_{args.dataset}" if args.arch == "resnet20" else f"zsq_{args.dataset}_{args.arch}"
    return REPO / "runs" / cli.run_folder_name(prefix, config)


def main(argv=None) -> int:
    return cli.main(build_parser(), argv, preset_values, build_task, default_out,
                    task_errors=(TeacherError, DataNotFoundError), check_args=check_args, script=__file__)


if __name__ == "__main__":
    sys.exit(main())
