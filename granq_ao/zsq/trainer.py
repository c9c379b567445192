"""Zero-shot quantization-aware training: GranQ's recipe (AdaDFQ's generator/student game).

One iteration, for a batch of ``B`` latent codes ``z`` and uniform labels ``y``
(per process ``B / world_size`` of them, from a per-(seed, epoch, rank) random stream)::

    x = G(z, y)                                   # synthetic images, normalized space
    t = teacher(x)   (BN input statistics recorded), s = student(x)
    G step:  minimize L_G(t, s, y, BN stats)      # through teacher and student; only G's params
    S step:  s = student(x.detach());  minimize L_S(t.detach(), s)      (not in warm-up epochs)

``L_G`` and ``L_S`` are in :mod:`granq_ao.zsq.losses`. The teacher is frozen; the student is a
GranQ fake-quantized QAT copy with frozen BN statistics (:mod:`granq_ao.zsq.student`), used in
eval mode as in the official code. Optimizers: Adam(lr_g, betas (0.5, 0.999)) for G, SGD
(nesterov, momentum 0.9, weight decay 1e-4) for the student; both learning rates are multiplied
by ``lr_decay`` at each milestone epoch. After every epoch the student is evaluated on real
test images and a checkpoint is written atomically; the reported accuracy is the final epoch's.

Data parallel: under ``torchrun`` each process generates its share of the batch; the student
is wrapped in ``DistributedDataParallel`` (gradients averaged); the generator's gradients are
all-reduced (averaged) by hand before each Adam step, so its parameters stay identical on every
process. Batch-dependent statistics (the generator's BatchNorm, the teacher BN-statistics loss,
per-tensor/per-channel activation ranges) are computed per process, as in DDP without SyncBN.
Only process 0 writes files.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from granq_ao.config import GranQScheme

from .distributed import DistributedContext
from .evaluation import accuracy_entry, check_eval_data, describe_eval_data, format_accuracy, mcnemar_exact_p, per_image_correct
from .checkpoint import atomic_torch_save, atomic_write, atomic_write_json, load_checkpoint, rng_state, set_rng_state
from .generator import GDFQGenerator
from .losses import (GENERATOR_LOSSES, STUDENT_LOSSES, gdfq_generator_loss, generator_loss, record_batchnorm_inputs,
                     student_loss)
from .student import check_student_options, student_protocol

__all__ = ["ZSQConfig", "DistributedContext", "ZSQTrainer", "lr_at_epoch", "seed_for", "CHECKPOINT_NAME",
           "RESUMABLE_CHANGES"]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 2
# Config fields that may differ between a checkpoint and the run that resumes it.
RESUMABLE_CHANGES = ("epochs",)
# run_info entries that only describe where things came from (paths may move between sessions).
DESCRIPTIVE_INFO = ("teacher", "eval", "teacher_weights", "data_root")


@dataclass
class ZSQConfig:
    """The options of a zero-shot QAT run, for any teacher (saved in checkpoints and results.json).

    The student's quantization (``weight_bits`` ... ``act_placement``, the vocabulary of
    :meth:`granq_ao.config.GranQScheme.from_kwargs`) and the toolchain that builds it; the
    schedule, optimizers and losses of the paper (AdaDFQ game). Defaults are the paper's CIFAR
    settings; the teacher, its data and the image size are arguments of the trainer."""

    weight_bits: int = 4
    act_bits: int = 4
    act_granularity: str = "granq"
    weight_granularity: str = "channel"
    act_placement: str = "paper"
    epochs: int = 200
    iters_per_epoch: int = 200
    batch_size: int = 16
    warmup_epochs: int = 4
    lr: float = 1e-4                      # student SGD
    lr_generator: float = 1e-3            # generator Adam
    lr_milestones: Tuple[int, ...] = (100,)
    lr_decay: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    generator_betas: Tuple[float, float] = (0.5, 0.999)
    latent_dim: int = 100
    temperature: float = 20.0
    student_loss: str = "entropy"         # "entropy" (GranQ/AdaDFQ) | "kl"
    generator_loss: str = "adadfq"        # "adadfq" (margin + CE(t -/+ s) + BNS) | "gdfq" (CE(t) + gamma * BNS)
    alpha_ds: float = 0.2                 # weight of CE(y, t - s)
    alpha_as: float = 0.1                 # weight of CE(y, t + s)
    beta: float = 1.0                     # weight of the two CE terms together
    gamma: float = 1.0                    # weight of the BN-statistics loss
    entropy_lower: float = 0.1            # hinge bounds on the normalized disagreement entropy
    entropy_upper: float = 0.8
    seed: int = 0
    eval_batch_size: int = 256
    toolchain: str = "fx"                 # which integration builds the student: fx | pt2e | modelopt
    fold_bn: bool = False                 # frozen student BN folded into its convs' forward (same math)

    def validate(self) -> "ZSQConfig":
        """Raise ``ValueError`` with a readable message for any bad field; return self."""
        problems = []
        try:
            check_student_options(self.toolchain, self.fold_bn)
        except ValueError as error:
            problems.append(str(error))
        try:
            self.scheme()
        except (TypeError, ValueError) as error:
            problems.append(str(error))
        for name in ("epochs", "iters_per_epoch", "batch_size", "eval_batch_size", "latent_dim"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.warmup_epochs < 0:
            problems.append(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.student_loss not in STUDENT_LOSSES:
            problems.append(f"student_loss must be one of {STUDENT_LOSSES}, got {self.student_loss!r}")
        if self.generator_loss not in GENERATOR_LOSSES:
            problems.append(f"generator_loss must be one of {GENERATOR_LOSSES}, got {self.generator_loss!r}")
        if not (math.isfinite(float(self.gamma)) and self.gamma >= 0):
            problems.append(f"gamma must be a finite number >= 0, got {self.gamma!r}")
        for name in ("lr", "lr_generator", "temperature"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            problems.append(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        if not 0 <= self.entropy_lower <= self.entropy_upper <= 1:
            problems.append("need 0 <= entropy_lower <= entropy_upper <= 1")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def scheme(self, fused: Any = "auto") -> GranQScheme:
        """The student's :class:`~granq_ao.config.GranQScheme` (validated there). ``fused`` is a
        run-time choice (same numbers), not part of the saved config."""
        return GranQScheme.from_kwargs(self.weight_bits, self.act_bits, self.act_granularity,
                                       self.weight_granularity, self.act_placement, fused=fused)

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["lr_milestones"] = list(self.lr_milestones)
        out["generator_betas"] = list(self.generator_betas)
        return out

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "ZSQConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        values = dict(values)
        if "lr_milestones" in values:
            values["lr_milestones"] = tuple(int(m) for m in values["lr_milestones"])
        if "generator_betas" in values:
            values["generator_betas"] = tuple(float(b) for b in values["generator_betas"])
        return cls(**values)


def refuse_finished_folder(out_dir: os.PathLike) -> None:
    """``FileExistsError`` when ``out_dir`` already holds a run (its checkpoint): a new run there
    would replace it; resume it or choose another folder."""
    if (Path(out_dir) / CHECKPOINT_NAME).exists():
        raise FileExistsError(f"{out_dir} already holds a run ({CHECKPOINT_NAME}); pass --resume to "
                              f"continue it, or choose another --out")


def seed_everything(seed: int) -> None:
    """Seed torch's (CPU and CUDA) and NumPy's global generators with ``seed``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def lr_at_epoch(base_lr: float, epoch: int, milestones: Sequence[int], decay: float) -> float:
    """``base_lr * decay ** (number of milestones <= epoch)`` (epochs counted from 0)."""
    return base_lr * decay ** sum(1 for milestone in milestones if epoch >= milestone)


def seed_for(seed: int, epoch: int, rank: int) -> int:
    """A 63-bit seed for the latent/label stream of (run seed, epoch, process rank)."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(rank)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def format_duration(seconds: float) -> str:
    """``1d 02:03:04`` / ``02:03:04`` / ``03:04`` (hours only when needed)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(0.0, seconds)))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours:02d}:{minutes:02d}:{secs:02d}" if hours or days else f"{minutes:02d}:{secs:02d}"
    return f"{days}d {text}" if days else text


def _versions() -> Dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "granq_ao": _distribution_version("granq-ao")}
    for name in ("torchvision", "pytorchcv"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "unknown")
        except Exception:  # pragma: no cover - optional
            out[name] = "not installed"
    return out


def _distribution_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


class _NoBar:
    """Stand-in for tqdm when it is not installed."""

    def __init__(self, iterable, **kwargs):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


def _progress_bar(iterable, **kwargs):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar(iterable)
    return tqdm(iterable, **kwargs)


# ----------------------------------------------------------------------------- trainer
class ZSQTrainer:
    """Zero-shot QAT of ``teacher`` (any classifier ``nn.Module``) with ``config``.

    Args:
        config: the run's :class:`ZSQConfig`.
        teacher: the full-precision classifier; it is frozen (eval mode, no gradients) and moved
            to the device. It takes normalized images ``(N, channels, image_size, image_size)``.
        out_dir: folder for checkpoints and logs (``None``: nothing is written, no resume).
        num_classes: classes of the teacher (the generator is conditioned on them).
        image_size, channels: the teacher's input size (the generator makes such images).
        eval_data: real evaluation images (:mod:`granq_ao.zsq.evaluation`: an ``EvalSet``, a
            ``Dataset`` of ``(image, label)`` or a ``DataLoader``) or ``None`` (no accuracy).
        normalize: ``(mean, std)`` applied to ``eval_data`` batches; ``None`` when they are
            already normalized. Generated images are made in the normalized space directly.
        generator: a conditional generator ``G(z, labels)`` with ``sample_inputs`` (default
            :class:`~granq_ao.zsq.generator.GDFQGenerator` for ``num_classes``, ``image_size``).
        run_info: descriptive facts saved with the run (``teacher``, ``eval`` sources, a recipe's
            own options); a resumed run must bring the same ones.
        fused: the fake-quant path (``"auto"``, ``"compiled"``, ``"eager"``); the numbers are the
            same, so it is a run-time choice, not part of the config.
        seed_rng: seed torch's and NumPy's global generators with ``config.seed`` first (before
            the student and the generator are built). ``False`` when the caller did that itself
            before building the teacher (the recipes do: the teacher's construction is then part
            of the seeded stream, as it always was in ``recipes/zsq_cifar.py``).
        pictures: draw the run's pictures (:mod:`granq_ao.zsq.pictures`: accuracy per epoch,
            generated images, activation errors) into ``out_dir`` and TensorBoard (process 0).
        amp, channels_last: CUDA only (ignored, with a note, elsewhere); run-time choices, not
            part of the config. ``amp``: the training forward passes under bfloat16 autocast (no
            loss scaling needed; the fake-quant math, the losses and evaluation stay float32, but
            the logits keep bfloat16's ~3 significant digits, which coarsens ``t - s``; not yet
            run on a GPU here).
            ``channels_last``: teacher, student and generated images in NHWC memory format.
        eval_every: evaluate the student after every ``eval_every``-th epoch and always after the
            last (default 1: every epoch); a run-time choice (the training is the same).

    Files in ``out_dir`` (process 0 only): ``config.json``, ``checkpoint.pt`` (after every epoch,
    atomic), ``metrics.jsonl`` (one JSON line per epoch), ``tb/`` (TensorBoard, when installed and
    ``tensorboard=True``), ``student_final.pt`` and ``results.json`` at the end, and the pictures
    (``accuracy.png``, ``generated_epochNNN.png``, ``activation_error.png``/``.json``).
    """

    def __init__(self, config: ZSQConfig, teacher: nn.Module, out_dir: Optional[os.PathLike] = None, *,
                 num_classes: int, image_size: int = 32, channels: int = 3, eval_data: Any = None,
                 normalize=None, generator: Optional[nn.Module] = None,
                 run_info: Optional[Dict[str, Any]] = None, context: Optional[DistributedContext] = None,
                 resume: bool = False, tensorboard: bool = True, progress: Optional[bool] = None,
                 log: Callable[[str], None] = print, fused: Any = "auto", seed_rng: bool = True,
                 pictures: bool = True, amp: bool = False, channels_last: bool = False, eval_every: int = 1) -> None:
        self.config = config.validate()
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        for name, value in (("num_classes", num_classes), ("image_size", image_size), ("channels", channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if eval_data is not None:
            check_eval_data(eval_data)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.ctx = context or DistributedContext()
        self.device = self.ctx.device
        self.resume = resume
        self.use_tensorboard = tensorboard and self.out_dir is not None
        self.progress = progress
        self.draw_pictures = pictures
        if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
            raise ValueError(f"eval_every must be a positive integer, got {eval_every!r}")
        self.eval_every = eval_every
        on_cuda = self.ctx.device.type == "cuda"
        self.amp, self.channels_last = bool(amp) and on_cuda, bool(channels_last) and on_cuda
        self._cuda_only_ignored = [name for name, on in (("amp", amp), ("channels_last", channels_last))
                                   if on and not on_cuda]
        self._log = log
        self.num_classes, self.image_size, self.channels = num_classes, image_size, channels
        self.eval_data = eval_data
        self.normalize = normalize
        self.run_info = {"teacher": type(teacher).__name__,
                         "eval": describe_eval_data(eval_data) if eval_data is not None else None,
                         **(run_info or {})}
        cfg = self.config
        if cfg.batch_size % self.ctx.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {self.ctx.world_size} "
                             f"processes; each process generates batch_size / world_size images")
        self.local_batch = cfg.batch_size // self.ctx.world_size
        self.checkpoint = None
        if self.out_dir is None:
            if resume:
                raise ValueError("resume needs an out_dir holding the run's checkpoint")
        else:
            checkpoint_path = self.out_dir / CHECKPOINT_NAME
            if resume:
                if not checkpoint_path.is_file():
                    raise FileNotFoundError(f"nothing to resume: {checkpoint_path} does not exist")
                self.checkpoint = load_checkpoint(checkpoint_path)
                self._check_resumable(self.checkpoint)
            else:
                refuse_finished_folder(self.out_dir)

        if seed_rng:
            seed_everything(cfg.seed)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes; CUDA runs are not bit-reproducible anyway
        self.teacher = teacher
        self.teacher.eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.teacher.to(self.device)
        example_inputs = (torch.zeros(2, channels, image_size, image_size),)  # batch >= 2: torch.export
        self.protocol = student_protocol(cfg.toolchain)
        self.student = self.protocol.prepare(self.teacher, cfg.scheme(fused), example_inputs,
                                             fold_bn=cfg.fold_bn).to(self.device)
        self.fake_quants = self.protocol.count(self.student)
        if generator is None:
            generator = GDFQGenerator(num_classes, cfg.latent_dim, img_size=image_size, channels=channels)
        self.generator = generator.to(self.device)
        self.generator.train()
        self.optimizer_g = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr_generator,
                                            betas=tuple(cfg.generator_betas))
        self.optimizer_s = torch.optim.SGD(self.student.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                           weight_decay=cfg.weight_decay, nesterov=True)
        self.state: Dict[str, Any] = {"epoch": 0, "history": [], "elapsed_s": 0.0}
        if self.checkpoint is not None:
            self._load_checkpoint(self.checkpoint)
        if self.ctx.distributed:
            for tensor in list(self.generator.parameters()) + list(self.generator.buffers()):
                dist.broadcast(tensor.data, src=0)
            self.student_ddp = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False)
        else:
            self.student_ddp = self.student
        if self.channels_last:
            self.teacher.to(memory_format=torch.channels_last)
            self.student.to(memory_format=torch.channels_last)
        self._writer = None
        self._pictures = None

    @property
    def writes_files(self) -> bool:
        return self.ctx.is_main and self.out_dir is not None

    # ------------------------------------------------------------------ logging and files
    def log(self, message: str) -> None:
        if self.ctx.is_main:
            self._log(message)

    def _check_resumable(self, checkpoint: Dict[str, Any]) -> None:
        if checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format {checkpoint.get('format')!r} is not {CHECKPOINT_FORMAT}")
        saved = checkpoint["config"]
        current = self.config.to_dict()
        defaults = ZSQConfig().to_dict()  # a field added after the checkpoint was written: its default
        changed = [f"{k}: checkpoint {saved.get(k, defaults[k])!r} != now {current[k]!r}" for k in current
                   if k not in RESUMABLE_CHANGES and saved.get(k, defaults[k]) != current[k]]
        saved_info = checkpoint.get("run_info", {})
        changed += [f"{k}: checkpoint {saved_info.get(k)!r} != now {v!r}" for k, v in self.run_info.items()
                    if k not in DESCRIPTIVE_INFO and saved_info.get(k) != v]
        if changed:
            raise ValueError("cannot resume with a different configuration: " + "; ".join(changed))
        if checkpoint.get("world_size", 1) != self.ctx.world_size:
            raise ValueError(f"the checkpoint was written by a run with {checkpoint.get('world_size', 1)} "
                             f"process(es); resume it with the same number (now {self.ctx.world_size})")

    def _load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        self.generator.load_state_dict(checkpoint["generator"])
        self.student.load_state_dict(checkpoint["student"])
        self.optimizer_g.load_state_dict(checkpoint["optimizer_g"])
        self.optimizer_s.load_state_dict(checkpoint["optimizer_s"])
        set_rng_state(checkpoint["rng"])
        self.state = {key: checkpoint[key] for key in ("epoch", "history", "elapsed_s", "teacher", "pre_qat",
                                                       "last")}
        for key in ("activation_error_pre_qat", "activation_error_final"):  # pictures (optional)
            if key in checkpoint:
                self.state[key] = checkpoint[key]

    def _save_checkpoint(self) -> None:
        if not self.writes_files:
            return
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "run_info": self.run_info,
            "world_size": self.ctx.world_size,
            "generator": self.generator.state_dict(),
            "student": self.student.state_dict(),
            "optimizer_g": self.optimizer_g.state_dict(),
            "optimizer_s": self.optimizer_s.state_dict(),
            "rng": rng_state(),
            **self.state,
        }
        atomic_torch_save(checkpoint, self.out_dir / CHECKPOINT_NAME)

    def _write_metrics_file(self) -> None:
        """metrics.jsonl = the history held in the checkpoint (rewritten whole, atomically)."""
        if not self.writes_files:
            return
        text = "".join(json.dumps(row) + "\n" for row in self.state["history"])
        atomic_write(self.out_dir / "metrics.jsonl", lambda handle: handle.write(text), mode="w")

    def _open_tensorboard(self) -> None:
        if not (self.writes_files and self.use_tensorboard):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed
            self.log("(tensorboard not installed: metrics go to metrics.jsonl only)")
            return
        self._writer = SummaryWriter(log_dir=str(self.out_dir / "tb"), purge_step=self.state["epoch"] + 1)

    def _tensorboard_epoch(self, row: Dict[str, Any]) -> None:
        if self._writer is None:
            return
        for key, value in row.items():
            if isinstance(value, (int, float)) and key != "epoch":
                self._writer.add_scalar(key, value, row["epoch"])
        self._writer.flush()

    def _check_replicas(self) -> None:
        """Data parallel: the generator's and the student's parameters must be identical on every
        process (one float64 checksum each, compared by all-reduce min/max)."""
        if not self.ctx.distributed:
            return
        checksums = torch.tensor([sum(float(p.double().sum()) for p in self.generator.parameters()),
                                  sum(float(p.double().sum()) for p in self.student.parameters())],
                                 dtype=torch.float64)
        low, high = checksums.clone(), checksums.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise RuntimeError(f"replicas diverged across processes (generator, student checksums "
                               f"min {low.tolist()} max {high.tolist()})")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: nn.Module) -> Optional[Dict[str, Any]]:
        """Top-1 on the real evaluation images (summed over processes) with its Wilson interval,
        or None without evaluation data. ``model``: the teacher or the student (whose train/eval
        mode goes through its protocol)."""
        from torch.ao.quantization import disable_observer, enable_observer

        if self.eval_data is None:
            return None
        observers_on = [m for m in model.modules() if hasattr(m, "observer_enabled") and bool(m.observer_enabled[0])]
        model.apply(disable_observer)  # test images must not reach the export ranges
        try:
            correct = per_image_correct(model, self.eval_data, self.config.eval_batch_size, self.device,
                                        self.ctx.rank, self.ctx.world_size, self.normalize,
                                        set_training=self.protocol.set_training if model is self.student else None)
        finally:
            for module in observers_on:
                enable_observer(module)
        correct = self.ctx.all_reduce_sum(correct.to(self.device)).cpu()
        return {**accuracy_entry(int(correct.sum()), int(correct.numel())), "per_image": correct.to(torch.int8)}

    # ------------------------------------------------------------------ one iteration
    def _autocast(self):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.amp)

    def train_step(self, sampler: torch.Generator, train_student: bool) -> Dict[str, float]:
        cfg = self.config
        z, labels = self.generator.sample_inputs(self.local_batch, sampler, self.device)
        with self._autocast():
            images = self.generator(z, labels)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with record_batchnorm_inputs(self.teacher) as bn_records:
                teacher_logits = self.teacher(images)
            student_logits = self.student(images)  # plain module: no DDP hooks on the generator's backward
        # losses in float32 (under --amp the logits come out of the last layer in bfloat16; no-op otherwise)
        teacher_logits, student_logits = teacher_logits.float(), student_logits.float()
        if cfg.generator_loss == "gdfq":
            loss_g, parts = gdfq_generator_loss(teacher_logits, labels, bn_records, cfg.gamma)
        else:
            loss_g, parts = generator_loss(teacher_logits, student_logits, labels, bn_records, cfg.alpha_ds,
                                           cfg.alpha_as, cfg.beta, cfg.gamma, cfg.entropy_lower, cfg.entropy_upper)
        generator_params = [p for p in self.generator.parameters() if p.requires_grad]
        self.optimizer_g.zero_grad(set_to_none=True)
        loss_g.backward(inputs=generator_params)
        if self.ctx.distributed:
            for parameter in generator_params:
                dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
                parameter.grad.div_(self.ctx.world_size)
        self.optimizer_g.step()

        teacher_logits = teacher_logits.detach()
        if train_student:
            with self._autocast():
                student_logits = self.student_ddp(images.detach()).float()
            loss_s = student_loss(cfg.student_loss, teacher_logits, student_logits, cfg.temperature)
            self.optimizer_s.zero_grad(set_to_none=True)
            loss_s.backward()
            self.optimizer_s.step()
        else:  # warm-up: the student is unchanged, its logits on x are those computed above
            loss_s = student_loss(cfg.student_loss, teacher_logits, student_logits.detach(), cfg.temperature)
        student_logits = student_logits.detach()
        return {
            "loss_g": float(loss_g.detach()), "loss_s": float(loss_s.detach()),
            **{f"loss_g_{name}": float(value) for name, value in parts.items()},
            "gen_teacher_acc": float((teacher_logits.argmax(1) == labels).float().mean()),
            "gen_student_agree": float((student_logits.argmax(1) == teacher_logits.argmax(1)).float().mean()),
        }

    # ------------------------------------------------------------------ the loop
    def run(self, stop_after_epochs: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """Train until ``config.epochs`` (or stop after ``stop_after_epochs`` epochs of this call,
        returning None: a simulated interruption). Returns the results dict (see results.json)."""
        cfg = self.config
        self._clock = time.time()
        if self.writes_files:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json({"config": cfg.to_dict(), "run_info": self.run_info, "world_size": self.ctx.world_size,
                               "device": str(self.device), "versions": _versions()}, self.out_dir / "config.json")
        self.log(f"teacher  : {self.run_info['teacher']}")
        self.log(f"student  : W{cfg.weight_bits}A{cfg.act_bits} act {cfg.act_granularity} ({cfg.act_placement} "
                 f"placement), weights {cfg.weight_granularity}, {cfg.toolchain}; fake-quants {self.fake_quants}")
        self.log(f"eval     : {self.run_info['eval'] or 'none (no accuracy is measured)'}")
        if self._cuda_only_ignored:
            self.log(f"note     : {', '.join(self._cuda_only_ignored)} ignored on {self.device.type} (CUDA only)")
        fresh = self.state["epoch"] == 0 and "teacher" not in self.state
        if fresh:
            self.state["teacher"] = self.evaluate(self.teacher)
            self.state["pre_qat"] = self.evaluate(self.student)
            self.state["last"] = self.state["pre_qat"]
        else:
            self.log(f"resuming after epoch {self.state['epoch']} of {cfg.epochs}")
        if self.eval_data is not None:
            self.log(f"teacher accuracy {format_accuracy(self.state['teacher'])}; "
                     f"W{cfg.weight_bits}A{cfg.act_bits} before QAT {format_accuracy(self.state['pre_qat'])}")
        self._write_metrics_file()
        self._open_tensorboard()
        if self.writes_files and self.draw_pictures:
            from .pictures import RunPictures

            self._pictures = RunPictures(self)
            if fresh:
                self._pictures.start()
        epochs_this_call = 0
        try:
            while self.state["epoch"] < cfg.epochs:
                if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs:
                    return None
                self._run_epoch(self.state["epoch"])
                epochs_this_call += 1
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        self._tick()
        results = self._results()
        if self.writes_files:
            atomic_torch_save(self.student.state_dict(), self.out_dir / "student_final.pt")
            atomic_write_json(results, self.out_dir / "results.json")
        return results

    def _tick(self) -> None:
        """Add the wall time since the last tick to ``elapsed_s`` (kept across resumes)."""
        now = time.time()
        self.state["elapsed_s"] += now - self._clock
        self._clock = now

    def _run_epoch(self, epoch: int) -> None:
        cfg = self.config
        lr_s = lr_at_epoch(cfg.lr, epoch, cfg.lr_milestones, cfg.lr_decay)
        lr_g = lr_at_epoch(cfg.lr_generator, epoch, cfg.lr_milestones, cfg.lr_decay)
        for group in self.optimizer_s.param_groups:
            group["lr"] = lr_s
        for group in self.optimizer_g.param_groups:
            group["lr"] = lr_g
        warmup = epoch < cfg.warmup_epochs
        sampler = torch.Generator(device=self.device)
        sampler.manual_seed(seed_for(cfg.seed, epoch, self.ctx.rank))
        self.generator.train()
        self.protocol.set_training(self.student, False)  # BN frozen; fake-quants on; as the official code
        show = self.progress if self.progress is not None else sys.stderr.isatty()
        bar = _progress_bar(range(cfg.iters_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}" + (" warm-up" if warmup else ""),
                   disable=not (show and self.ctx.is_main), leave=False, dynamic_ncols=True)
        sums: Dict[str, float] = {}
        start = time.time()
        for done, _ in enumerate(bar, start=1):
            step = self.train_step(sampler, train_student=not warmup)
            for key, value in step.items():
                sums[key] = sums.get(key, 0.0) + value
            s_per_iter = (time.time() - start) / done
            left = cfg.iters_per_epoch - done + (cfg.epochs - epoch - 1) * cfg.iters_per_epoch
            bar.set_postfix(loss_s=f"{step['loss_s']:.3g}", loss_g=f"{step['loss_g']:.3g}",
                            s_iter=f"{s_per_iter:.2f}", eta=format_duration(left * s_per_iter))
        bar.close()
        train_time = time.time() - start
        totals = self.ctx.all_reduce_sum(torch.tensor([sums[k] for k in sorted(sums)], dtype=torch.float64))
        means = {k: float(v) / (cfg.iters_per_epoch * self.ctx.world_size) for k, v in zip(sorted(sums), totals)}
        for value in means.values():
            if not math.isfinite(value):
                raise FloatingPointError(f"a loss became non-finite in epoch {epoch + 1}: {means}")
        self._check_replicas()
        evaluate_now = (epoch + 1) % self.eval_every == 0 or epoch + 1 == cfg.epochs
        test = self.evaluate(self.student) if evaluate_now else None
        row = {"epoch": epoch + 1, "phase": "warmup" if warmup else "qat", "lr": lr_s, "lr_g": lr_g, **means,
               "train_time_s": train_time, "s_per_iter": train_time / cfg.iters_per_epoch}
        if test is not None:
            row.update({"test_acc": test["acc"], "test_correct": test["correct"], "n_test": test["n"],
                        "test_ci95_low": test["ci95"][0], "test_ci95_high": test["ci95"][1]})
        self.state["history"].append(row)
        if evaluate_now:
            self.state["last"] = test
        self.state["epoch"] = epoch + 1
        self._tick()
        self._save_checkpoint()  # checkpoint first: metrics.jsonl is rewritten from it on resume
        self._write_metrics_file()
        self._tensorboard_epoch(row)
        if self._pictures is not None:
            self._pictures.epoch_end(epoch + 1)
        epoch_wall = time.time() - start  # training, evaluation, files
        second_term = (f"ce {means['loss_g_ce']:.3f}" if cfg.generator_loss == "gdfq"
                       else f"margin {means['loss_g_margin']:.3f}")
        self.log(f"epoch {epoch + 1:>3}/{cfg.epochs} {row['phase']:<6} lr {lr_s:.2g} | L_G {means['loss_g']:.4f} "
                 f"(bns {means['loss_g_bns']:.4f}, {second_term}) | L_S {means['loss_s']:.4f} "
                 + (f"| test {format_accuracy(test)} " if test is not None else "")
                 + f"| {train_time / cfg.iters_per_epoch:.2f} s/iter | ETA "
                 + format_duration((cfg.epochs - epoch - 1) * epoch_wall))

    def _results(self) -> Dict[str, Any]:
        cfg = self.config
        history: List[Dict[str, Any]] = self.state["history"]
        results: Dict[str, Any] = {
            "teacher_acc": None, "pre_qat_acc": None, "final_acc": None, "n_test": None,
            "epochs_completed": self.state["epoch"],
            "eval_source": self.run_info["eval"],
            "teacher_source": self.run_info["teacher"],
            "run_info": self.run_info,
            "fake_quants": self.fake_quants,
            "config": cfg.to_dict(),
            "world_size": self.ctx.world_size,
            "device": str(self.device),
            "versions": _versions(),
            "wall_time_s": self.state["elapsed_s"],
            "mean_s_per_iter": float(np.mean([row["s_per_iter"] for row in history])) if history else None,
        }
        if self.state.get("teacher") is None:
            return results
        final_entry = self.state["last"]
        pre = self.state["pre_qat"]["per_image"].long()
        fin = final_entry["per_image"].long()
        fixed, broken = int(((pre == 0) & (fin == 1)).sum()), int(((pre == 1) & (fin == 0)).sum())
        teacher, pre_qat = self.state["teacher"], self.state["pre_qat"]
        results.update({
            "teacher_acc": teacher["acc"],
            "pre_qat_acc": pre_qat["acc"],
            "final_acc": final_entry["acc"],
            "n_test": final_entry["n"],
            "intervals": {"method": "Wilson score interval, 95%", "teacher": teacher["ci95"],
                          "pre_qat": pre_qat["ci95"], "final": final_entry["ci95"]},
            "correct": {"teacher": teacher["correct"], "pre_qat": pre_qat["correct"], "final": final_entry["correct"]},
            "final_vs_pre_qat": {"fixed": fixed, "broken": broken, "mcnemar_exact_p": mcnemar_exact_p(fixed, broken),
                                 "note": "same test images: fixed = wrong before QAT and right after, broken = "
                                         "the reverse; exact two-sided McNemar test"},
        })
        evaluated = [row for row in history if "test_acc" in row]
        if evaluated:
            best = max(evaluated, key=lambda row: (row["test_acc"], -row["epoch"]))
            results["best_on_test"] = {"acc": best["test_acc"], "epoch": best["epoch"],
                                       "note": "max over epochs of the TEST accuracy: test-set selection, "
                                               "optimistic; the reported number is final_acc"}
        return results
