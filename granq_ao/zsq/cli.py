"""The command line shared by the zero-shot recipes (``recipes/zsq_cifar.py``, ``recipes/zsq_imagenet.py``).

A recipe is a thin script: it adds its data flags (dataset, teacher, evaluation images) to
:func:`build_parser`, and gives :func:`main` a ``build_task(args, config, context)`` that
returns a :class:`Task` (teacher, evaluation data, classes, image size, normalization, facts to
save). Everything else is here, once: the quantization and schedule flags (the vocabulary of
:mod:`granq_ao.config`), presets, ``--resume`` (the checkpoint's configuration, flags that would
change it refused), validation before any heavy work (exit status 2 with one line), a lock on
the output folder, progress, the summary with 95% intervals.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from granq_ao.config import (ACT_GRANULARITIES, FUSED_MODES, MAX_BITS, MIN_BITS, PLACEMENTS, WEIGHT_GRANULARITIES,
                             check_bits)

from .checkpoint import atomic_write, load_checkpoint
from .distributed import DistributedContext
from .evaluation import format_accuracy
from .options import RunOptions
from .losses import GENERATOR_LOSSES, STUDENT_LOSSES
from .student import TOOLCHAINS
from .config import ZSQConfig
from .run_record import CHECKPOINT_NAME, RESUMABLE_CHANGES, refuse_finished_folder
from .trainer import ZSQTrainer, seed_everything

__all__ = ["Task", "build_parser", "main", "summary_block", "OutputLock", "FLAG_FIELDS",
           "saved_run_info", "run_folder_name"]

# The ZSQConfig fields set by flags: each flag is the field's name (``--weight-bits`` sets
# ``weight_bits``); short aliases (--wbits, --abits, --iters, --lr-g, --loss) are kept.
FLAG_FIELDS = ("weight_bits", "act_bits", "act_granularity", "weight_granularity", "act_placement", "toolchain",
               "epochs", "iters_per_epoch", "batch_size", "warmup_epochs", "lr", "lr_generator", "lr_milestones",
               "temperature", "student_loss", "generator_loss", "gamma", "bns_standardized", "seed", "eval_batch_size",
               "fold_bn")


@dataclass
class Task:
    """What a recipe zero-shot-quantizes: the teacher and what it takes, and real images to measure it."""

    teacher: torch.nn.Module
    num_classes: int
    image_size: int
    eval_data: Any = None
    normalize: Any = None
    run_info: Dict[str, Any] = field(default_factory=dict)  # saved; non-descriptive entries must match on resume
    generator: Optional[torch.nn.Module] = None


# ----------------------------------------------------------------------------- argument types
def _integer(text: str, minimum: int, maximum: int, what: str) -> int:
    """``int(text)`` if it lies in [minimum, maximum], else an argparse error naming ``what``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not minimum <= value <= maximum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def bits(text: str) -> int:
    try:
        return check_bits(int(text))
    except ValueError as error:  # int() of a non-number, or check_bits' own message
        message = str(error) if "bits" in str(error) else f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def positive_int(text: str) -> int:
    return _integer(text, 1, sys.maxsize, "a positive integer")


def non_negative_int(text: str) -> int:
    return _integer(text, 0, sys.maxsize, "an integer >= 0")


def seed(text: str) -> int:
    return _integer(text, 0, 2 ** 63 - 1, "an integer >= 0 and below 2^63")


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show ``(default: X)`` only for flags whose default is a value (None = preset decides)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser(description: str, presets: Dict[str, str]) -> argparse.ArgumentParser:
    """The shared flags; ``presets`` maps preset names (the first is the default) to their help."""
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    # Every training flag defaults to None = "the preset's value" (or the checkpoint's with --resume).
    add = parser.add_argument
    names = list(presets)
    add("--preset", choices=names, default=names[0],
        help="; ".join(f"{name}: {text}" for name, text in presets.items()))
    add("--weight-bits", "--wbits", type=bits, default=None, help=f"weight bits, {MIN_BITS}..{MAX_BITS} (default 4)")
    add("--act-bits", "--abits", type=bits, default=None, help=f"activation bits, {MIN_BITS}..{MAX_BITS} (default 4)")
    add("--act-granularity", choices=ACT_GRANULARITIES, default=None, help="activation ranges (default granq)")
    add("--weight-granularity", choices=WEIGHT_GRANULARITIES, default=None,
        help="weight ranges: channel = per output channel (default); kernel = per (out, in) slice (official code)")
    add("--act-placement", choices=PLACEMENTS, default=None,
        help="paper: activations quantized after ReLU/ReLU6 only (default); inputs: the input of every conv/linear "
             "(any network: SiLU, Hardswish, GELU); all: the toolchain's placement")
    add("--toolchain", choices=TOOLCHAINS, default=None, help="integration that builds the student: fx = torch.ao FX (default), pt2e = torchao PT2E, modelopt")
    add("--epochs", type=positive_int, default=None)
    add("--iters-per-epoch", "--iters", type=positive_int, default=None, help="iterations per epoch")
    add("--batch-size", type=positive_int, default=None, help="synthetic images per iteration (all processes)")
    add("--warmup-epochs", type=non_negative_int, default=None, help="epochs that train the generator only")
    add("--lr", type=positive_float, default=None, help="student SGD learning rate")
    add("--lr-generator", "--lr-g", type=positive_float, default=None, help="generator Adam learning rate")
    add("--lr-milestones", type=non_negative_int, nargs="*", default=None,
        help="epochs (0-based) at which both learning rates are multiplied by 0.1")
    add("--temperature", type=positive_float, default=None, help="student-loss temperature")
    add("--student-loss", "--loss", choices=STUDENT_LOSSES, default=None,
        help="student loss: entropy = GranQ/AdaDFQ -T^2 H(softmax((t-s)/T)); kl = T^2 KL distillation")
    add("--generator-loss", choices=GENERATOR_LOSSES, default=None,
        help="generator objective: adadfq = AdaDFQ's margin + CE(y, t -/+ s) + gamma * BNS (default); "
             "gdfq = GDFQ's CE(y, t) + gamma * BNS (GDFQ's code uses --gamma 0.1)")
    add("--gamma", type=non_negative_float, default=None, help="weight of the BN-statistics loss (default 1.0)")
    add("--seed", type=seed, default=None, help="(default 0)")
    add("--bns-standardized", action="store_true", default=None,
        help="BN-statistics loss in units of each channel's running std (not the paper's; for teachers whose "
             "activation scales differ widely, e.g. raw-pixel inputs: docs/NETWORKS.md)")
    add("--fold-bn", action="store_true", default=None,
        help="student: compute each frozen conv-BN as conv(x, fq(w*sf), folded bias) instead of torch.ao's "
             "divide-then-BN (same parameters and function up to float rounding; faster)")
    add("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    add("--out", default=None, help="output folder (default runs/<recipe>_<settings>_<time>)")
    add("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add("--eval-batch-size", type=positive_int, default=None, help="(default 256)")
    add("--fused", choices=FUSED_MODES, default=None,
        help="fake-quant path: compiled = torch.compile'd, eager = plain ops (same numbers), auto = compiled "
             "where torch.compile works. Default: compiled on CUDA, eager on CPU (compiling costs more than it "
             "saves for a short run on CPU)")
    # Run options (not the config): default None = "1 / off", or the checkpoint's with --resume.
    add("--no-tensorboard", action="store_true", default=None, help="do not write TensorBoard logs")
    add("--eval-every", type=positive_int, default=None,
        help="evaluate the student after every N-th epoch and the last (evaluation on a large set costs; default 1)")
    add("--no-pictures", action="store_true", default=None,
        help="do not draw the pictures (accuracy per epoch, generated images, activation errors: PNG + TensorBoard)")
    add("--amp", action="store_true", default=None,
        help="CUDA: bfloat16 autocast for the training forward passes (fake-quant math and evaluation stay "
             "float32); ignored on CPU")
    add("--channels-last", action="store_true", default=None,
        help="CUDA: NHWC memory format for the networks; ignored on CPU")
    return parser


# ----------------------------------------------------------------------------- configuration
def _checkpoint_of(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """The checkpoint of the run in ``--out`` (exit 2 with one line when absent or damaged)."""
    checkpoint_path = Path(args.out) / CHECKPOINT_NAME
    if not checkpoint_path.is_file():
        parser.error(f"--resume: no checkpoint at {checkpoint_path}")
    try:
        return load_checkpoint(checkpoint_path)
    except ValueError as error:
        parser.error(str(error))


def saved_run_info(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """The ``run_info`` saved with the run being resumed (a recipe's own options)."""
    return dict(_checkpoint_of(args, parser).get("run_info", {}))


def resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser,
                   preset_values: Callable[[argparse.Namespace], Dict[str, Any]]) -> ZSQConfig:
    """The run's config: the checkpoint's with ``--resume`` (only ``--epochs`` may change it), else
    the preset's values overridden by explicit flags."""
    explicit = {field: getattr(args, field) for field in FLAG_FIELDS if getattr(args, field) is not None}
    if "lr_milestones" in explicit:
        explicit["lr_milestones"] = tuple(explicit["lr_milestones"])
    if args.resume:
        checkpoint = _checkpoint_of(args, parser)
        saved = checkpoint["config"]
        conflicts = [f"--{field.replace('_', '-')} {explicit[field]!r} (run has {saved.get(field)!r})"
                     for field in FLAG_FIELDS
                     if field in explicit and field not in RESUMABLE_CHANGES
                     and _normalized(explicit[field]) != _normalized(saved.get(field))]
        if conflicts:
            parser.error("--resume continues the run as it was configured; these flags differ: " + ", ".join(conflicts))
        done = int(checkpoint.get("epoch", 0))
        if explicit.get("epochs", saved.get("epochs", 0)) < done:
            parser.error(f"--resume: the run in {args.out} already completed {done} epochs; --epochs must be "
                         f">= {done} (or leave it out)")
        return ZSQConfig.from_dict({**saved, **explicit})
    return ZSQConfig(**{**preset_values(args), **explicit})


# Run-option flags: (RunOptions field, flag, the option's value from the flag's).
OPTION_FLAGS = (("eval_every", "eval_every", lambda value: value), ("fused", "fused", lambda value: value),
                ("tensorboard", "no_tensorboard", lambda value: not value),
                ("pictures", "no_pictures", lambda value: not value),
                ("amp", "amp", bool), ("channels_last", "channels_last", bool))


def resolve_options(args: argparse.Namespace, parser: argparse.ArgumentParser,
                    context: DistributedContext) -> RunOptions:
    """The run options: the flags given; with ``--resume``, the checkpoint's saved options for
    those not given (``--amp`` may not change); else the defaults (evaluation every epoch, files
    and pictures on, fake-quant path compiled on CUDA and eager on CPU)."""
    # RunOptions' own defaults, but the fake-quant path by device (the recipes' choice, see --fused)
    defaults = {**RunOptions().saved(), "fused": "compiled" if context.device.type == "cuda" else "eager"}
    saved = dict(_checkpoint_of(args, parser).get("options") or {}) if args.resume else {}
    values = {}
    for name, flag, from_flag in OPTION_FLAGS:
        given = getattr(args, flag)
        values[name] = from_flag(given) if given is not None else saved.get(name, defaults[name])
    for name in RunOptions.FIXED_ON_RESUME:  # checked here as asked (the trainer checks what applies on its device)
        if name in saved and bool(saved[name]) != bool(values[name]):
            parser.error(f"--resume continues the run as it was configured; it ran with {name}={saved[name]!r} "
                         "(this option changes what is computed)")
    return RunOptions(seed_rng=False, **values)


def _normalized(value):
    return list(value) if isinstance(value, (tuple, list)) else value


# ----------------------------------------------------------------------------- the output folder
class OutputLock:
    """An exclusive claim on a run folder: ``<out>/.lock`` holding the owner's pid, created with
    ``O_EXCL``. A lock left by a process that no longer exists is taken over. Two runs with the
    same ``--out`` therefore cannot both write it: the second stops at once."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / ".lock"
        self.held = False

    def acquire(self) -> None:
        """Create the folder and the lock, or raise ``ValueError`` (unusable folder, or locked)."""
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"--out {folder}: cannot create the folder ({error.strerror or error})") from None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and _alive(owner):
                    raise ValueError(f"--out {folder} is in use by another run (pid {owner}); wait for it or "
                                     "choose another --out") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            except OSError as error:
                raise ValueError(f"--out {folder}: cannot write there ({error.strerror or error})") from None
            with os.fdopen(fd, "w") as handle:
                handle.write(str(os.getpid()))
            self.held = True
            return
        raise ValueError(f"--out {folder}: could not take the lock {self.path}")

    def _owner(self) -> Optional[int]:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- output
def summary_block(results: Dict[str, Any]) -> str:
    """Teacher, pre-QAT and final accuracy with n and 95% intervals, the paired test, timing."""
    config = results["config"]
    tag = f"W{config['weight_bits']}A{config['act_bits']}"
    timing = (f"{results['wall_time_s'] / 60:.1f} min"
              + (f", {results['mean_s_per_iter']:.2f} s/iter" if results.get("mean_s_per_iter") is not None else ""))
    if results.get("final_acc") is None:
        return f"(no evaluation data: no accuracy measured; {timing})"
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
    best = results.get("best_on_test")
    if best is not None:
        lines.append(f"(95% Wilson intervals, percentage points; final = epoch {results['epochs_completed']}; "
                     f"best epoch on test = {100 * best['acc']:.2f}% at epoch {best['epoch']}, test-set selection)")
    lines.append(f"(act {config['act_granularity']}, weights {config['weight_granularity']}, {config['toolchain']}, "
                 f"{timing}, images: {results['eval_source']})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the run
def output_folder(args: argparse.Namespace, parser: argparse.ArgumentParser, config: ZSQConfig,
                  default_out: Callable[[argparse.Namespace, ZSQConfig], Path]) -> Path:
    """``--out`` (or the default folder), refused with a one-line error if it is a file or, for a
    new run, holds a finished run (checked before any heavy work; the trainer checks it again for
    its Python callers)."""
    out = Path(args.out) if args.out is not None else default_out(args, config)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file, not a folder")
    if not args.resume:
        try:
            refuse_finished_folder(out)
        except FileExistsError as error:
            parser.error(str(error))
    return out


def main(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
         preset_values: Callable[[argparse.Namespace], Dict[str, Any]],
         build_task: Callable[[argparse.Namespace, ZSQConfig, DistributedContext], Task],
         default_out: Callable[[argparse.Namespace, ZSQConfig], Path],
         task_errors: tuple = (),
         check_args: Optional[Callable[[argparse.Namespace, argparse.ArgumentParser], None]] = None,
         script: Optional[os.PathLike] = None) -> int:
    """Parse, validate, lock the output folder, build the task, train, print the summary.
    ``script`` is the recipe's file (for the resume command; default ``sys.argv[0]``).

    Every problem that can be found before training (bad flags, unusable ``--out``, a damaged
    checkpoint, a missing teacher or data: ``task_errors``) exits with status 2 and one line.
    Ctrl-C exits 130 after saying how to resume."""
    args = parser.parse_args(argv)
    if args.resume and args.out is None:
        parser.error("--resume needs --out DIR (the folder of the run to continue)")
    if check_args is not None:
        check_args(args, parser)
    try:
        config = resolve_config(args, parser, preset_values).validate()
    except ValueError as error:
        parser.error(str(error))
    out = output_folder(args, parser, config, default_out)
    try:
        context = DistributedContext.from_env(args.device)
    except (ValueError, RuntimeError) as error:
        parser.error(f"--device {args.device}: {error}")
    lock = OutputLock(out)
    try:
        if context.is_main:
            try:
                lock.acquire()
            except ValueError as error:
                parser.error(str(error))
        trainer = _build_trainer(parser, args, config, context, out, build_task, task_errors)
        return _train(trainer, args, context, out, script)
    finally:
        lock.release()
        context.close()


def _build_trainer(parser, args, config, context, out, build_task, task_errors) -> ZSQTrainer:
    """The recipe's task and its trainer; a problem found there exits with status 2."""
    try:
        # Seed before the teacher is built: its construction is part of the seeded stream.
        seed_everything(config.seed)
        task = build_task(args, config, context)
        options = resolve_options(args, parser, context)
        return ZSQTrainer(config, task.teacher, out, num_classes=task.num_classes, image_size=task.image_size,
                          eval_data=task.eval_data, normalize=task.normalize, generator=task.generator,
                          run_info=task.run_info, context=context, resume=args.resume, options=options)
    except (FileExistsError, FileNotFoundError, ValueError, *task_errors) as error:
        parser.error(str(error))


def _train(trainer: ZSQTrainer, args, context: DistributedContext, out: Path,
           script: Optional[os.PathLike] = None) -> int:
    """Run, print the summary; 130 after Ctrl-C (with how to resume)."""
    if context.is_main:
        print(f"output   : {out}")
        command = write_resume_note(out, context.world_size, script)
        print(f"resume   : {command}   (after an interruption; also in {out / RESUME_NOTE})")
        if args.preset == "paper" and context.device.type == "cpu":
            config = trainer.config
            print(f"note     : --preset paper on a CPU is {config.epochs * config.iters_per_epoch:,} iterations at batch "
                  f"{config.batch_size}: hours to days (CIFAR-10 ResNet-20 at batch 16 took 6.0 h on 2 cores, two runs "
                  "side by side with OMP_NUM_THREADS=1; see the ETA after each epoch)")
    try:
        results = trainer.run()
    except KeyboardInterrupt:
        if context.is_main:
            print(f"\ninterrupted during epoch {trainer.state['epoch'] + 1}; the checkpoint after epoch "
                  f"{trainer.state['epoch']} is in {out}. Continue with:\n  {resume_command(out, context.world_size, script)}",
                  file=sys.stderr)
        return 130
    if context.is_main:
        print()
        print(summary_block(results))
        print(f"results  : {out / 'results.json'}")
    return 0


RESUME_NOTE = "RESUME.txt"


def resume_command(out: Path, world_size: int = 1, script: Optional[os.PathLike] = None) -> str:
    """The command that continues the run in ``out`` (the recipe ``script``, default ``sys.argv[0]``;
    absolute paths; torchrun with the same number of processes when there are several; this
    process's thread count as ``OMP_NUM_THREADS``, which CPU kernels split their sums by)."""
    script = Path(script if script is not None else sys.argv[0]).resolve()
    launcher = f"{sys.executable} -m torch.distributed.run --nproc_per_node={world_size}" if world_size > 1 \
        else sys.executable
    threads = f"OMP_NUM_THREADS={torch.get_num_threads()} "  # the same thread count: the same summation order
    return f"{threads}{launcher} {script} --resume --out {Path(out).resolve()}"


def write_resume_note(out: Path, world_size: int = 1, script: Optional[os.PathLike] = None) -> str:
    """``<out>/RESUME.txt``: how to continue the run (also on another machine), returns the command."""
    command = resume_command(out, world_size, script)
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(out) / RESUME_NOTE, lambda handle: handle.write(
        "Continue this run after an interruption (a killed process, a restarted machine):\n\n"
        f"    {command}\n\n"
        "It restarts after the last completed epoch (checkpoint.pt). The flags of the run are in the checkpoint\n"
        "(also --eval-every, --fused, --no-pictures, --no-tensorboard, --amp, --channels-last): only --epochs may\n"
        "be raised, and the run options (not --amp) may be given again to change them. On another machine, copy this folder and keep the teacher and data in\n"
        "../shared/data (or GRANQ_DATA_DIR). On the same CPU model, kernels and thread count (OMP_NUM_THREADS\n"
        "above) the result is bit-identical to an uninterrupted run; elsewhere the run continues correctly but\n"
        "rounds differently from then on (results.json lists the machines under 'machines').\n"), mode="w")
    return command


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def run_folder_name(prefix: str, config: ZSQConfig) -> str:
    """``<prefix>_w<W>a<A>_<act granularity>_<time>``: a recipe's default output folder name."""
    return f"{prefix}_w{config.weight_bits}a{config.act_bits}_{config.act_granularity}_{timestamp()}"
