#!/usr/bin/env python
"""Zero-shot GranQ quantization of an ImageNet classifier (no training data: a generator synthesizes it).

    python recipes/zsq_imagenet.py --arch resnet18 --val-dir /data/imagenet/val --val-subset 10000
    python recipes/zsq_imagenet.py --preset paper --arch resnet18 --wbits 3 --abits 3 --val-dir DIR --amp \\
        --channels-last                                    # the paper's schedule (a GPU: days)
    torchrun --nproc_per_node=8 recipes/zsq_imagenet.py --preset paper ...   # data parallel
    python recipes/zsq_imagenet.py --resume --out DIR      # continue an interrupted run
    python recipes/zsq_imagenet.py --arch torchvision:resnet18 --teacher-weights my_resnet18.pth --val-dir DIR

``--arch resnet18 | resnet50 | mobilenetv2_w1`` are pytorchcv's ImageNet models (the paper's);
``--arch torchvision:NAME`` takes torchvision's. Teacher weights come from ``--teacher-weights``
(a state dict of that provider; its classifier sets the number of classes) or the provider's
pretrained download (needs the internet). ``--val-dir`` is an ImageFolder in the ILSVRC2012 val
layout (one WordNet-id folder per class); images get the standard preprocessing (resize 256,
center crop 224, scaled with ``--image-size``; ImageNet mean/std). Prints the teacher's top-1, the
quantized student's before QAT and after the final epoch, each with a 95% Wilson interval and the
number of images; writes results.json, metrics.jsonl, pictures (PNG) and TensorBoard logs.
See README.md, "ImageNet (zero-shot)".
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# Sleeping OpenMP waits: see recipes/zsq_cifar.py. Must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from granq_ao.zsq import cli  # noqa: E402
from granq_ao.zsq.data import DataNotFoundError  # noqa: E402
from granq_ao.zsq.generator import ImageNetGenerator  # noqa: E402
from granq_ao.zsq.imagenet import (IMAGENET_NORMALIZATION, PAPER_ARCHS, build_imagenet_teacher,  # noqa: E402
                                   load_imagenet_val)
from granq_ao.zsq.teachers import TeacherError  # noqa: E402

DEFAULT_ARCH = "resnet18"
DEFAULT_IMAGE_SIZE = 224


def preset_values(args) -> dict:
    """Config fields a preset sets (explicit flags override them).

    ``paper``: the official ImageNet configuration files (AdaDFQ code, which GranQ builds on):
    400 epochs x 200 iterations of batch 16, student SGD lr 1e-5 and generator Adam lr 1e-3, both
    x0.1 at epochs 350 and 400 (the second milestone is never reached: 0-based epochs end at 399),
    50 generator-only warm-up epochs, student temperature 5, margin bounds [0.1, 0.8]. For
    ResNet-50 its own file: lr 1e-4, milestones 150, 300, 400, 100 warm-up epochs, lower margin
    bound 0.4. (Those files are the 3-bit settings; their comments suggest other milestones and
    warm-ups for 4/5 bits, which the flags can set.)
    ``default``: 5 epochs x 40 iterations (a smoke-scale check, minutes on a GPU), same rates.
    """
    common = dict(batch_size=16, lr_generator=1e-3, temperature=5.0)
    if args.preset == "paper":
        if args.arch in ("resnet50", "torchvision:resnet50"):
            return dict(common, epochs=400, iters_per_epoch=200, warmup_epochs=100, lr=1e-4,
                        lr_milestones=(150, 300, 400), entropy_lower=0.4)
        return dict(common, epochs=400, iters_per_epoch=200, warmup_epochs=50, lr=1e-5, lr_milestones=(350, 400))
    return dict(common, epochs=5, iters_per_epoch=40, warmup_epochs=1, lr=1e-5, lr_milestones=(4,))


def build_parser():
    parser = cli.build_parser(
        "Zero-shot GranQ QAT of an ImageNet teacher (AdaDFQ generator game, GranQ student).",
        {"default": "5 epochs x 40 iterations (a smoke-scale check)",
         "paper": "the official 400 x 200 schedule at batch 16 (a GPU: days)"})
    add = parser.add_argument
    add("--arch", default=None,
        help=f"teacher: {' | '.join(PAPER_ARCHS)} (pytorchcv, the paper's; other pytorchcv names work) or "
             f"torchvision:NAME (default {DEFAULT_ARCH}; with --resume the run's)")
    add("--teacher-weights", default=None,
        help="teacher state dict of that provider (default: its pretrained download, which needs the internet)")
    add("--val-dir", default=None,
        help="ImageNet validation images as an ImageFolder (one WordNet-id folder per class); without it no "
             "accuracy is measured")
    add("--val-subset", type=cli.positive_int, default=None,
        help="evaluate on N validation images (a fixed seeded choice) instead of all")
    add("--image-size", type=cli.positive_int, default=None,
        help=f"image side (multiple of 4; default {DEFAULT_IMAGE_SIZE}: center crop 224 of a 256 resize; "
             "smaller for quick checks)")
    add("--workers", type=cli.non_negative_int, default=min(8, os.cpu_count() or 1),
        help="data-loader processes decoding validation images")
    return parser


def check_args(args, parser) -> None:
    saved = cli.saved_run_info(args, parser) if args.resume else {}
    # a resumed run keeps its teacher, image size and evaluation subset (and finds its files again)
    for name, default in (("arch", DEFAULT_ARCH), ("image_size", DEFAULT_IMAGE_SIZE), ("val_subset", None)):
        if getattr(args, name) is None:
            setattr(args, name, saved.get(name, default))
    if args.teacher_weights is None:
        args.teacher_weights = saved.get("teacher_weights")
    if args.val_dir is None:
        args.val_dir = saved.get("data_root")
    if args.image_size % 4:
        parser.error(f"--image-size must be a multiple of 4 (the generator upsamples x4), got {args.image_size}")
    if args.val_subset is not None and args.val_dir is None:
        parser.error("--val-subset needs --val-dir")


def build_task(args, config, context) -> cli.Task:
    teacher, teacher_source, teacher_classes = build_imagenet_teacher(args.arch, args.teacher_weights,
                                                                      args.image_size)
    eval_data, eval_source = None, None
    if args.val_dir is not None:
        dataset, data_classes, eval_source = load_imagenet_val(args.val_dir, args.image_size, args.val_subset)
        if data_classes != teacher_classes:
            raise TeacherError(f"the teacher ({args.arch} from {teacher_source}) predicts {teacher_classes} classes "
                               f"but --val-dir {args.val_dir} has {data_classes} class folders")
        eval_data = torch.utils.data.DataLoader(
            dataset, batch_size=config.eval_batch_size, shuffle=False, num_workers=args.workers,
            pin_memory=context.device.type == "cuda", persistent_workers=args.workers > 0)
    return cli.Task(
        teacher=teacher, num_classes=teacher_classes, image_size=args.image_size, eval_data=eval_data,
        normalize=IMAGENET_NORMALIZATION,
        generator=ImageNetGenerator(teacher_classes, config.latent_dim, img_size=args.image_size),
        run_info={"arch": args.arch, "image_size": args.image_size, "val_subset": args.val_subset,
                  "teacher": f"{args.arch} from {teacher_source}", "teacher_weights": args.teacher_weights,
                  "eval": eval_source, "data_root": args.val_dir})


def default_out(args, config) -> Path:
    arch = args.arch.replace(":", "-")
    return REPO / "runs" / cli.run_folder_name(f"zsq_imagenet_{arch}", config)


def main(argv=None) -> int:
    return cli.main(build_parser(), argv, preset_values, build_task, default_out,
                    task_errors=(TeacherError, DataNotFoundError), check_args=check_args, script=__file__)


if __name__ == "__main__":
    sys.exit(main())
