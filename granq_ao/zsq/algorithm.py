"""The zero-shot QAT algorithm of one process: GranQ's recipe (AdaDFQ's generator/student game).

One iteration, for a batch of ``B`` latent codes ``z`` and uniform labels ``y``
(per process ``B / world_size`` of them, from a per-(seed, epoch, rank) random stream)::

    x = G(z, y)                                   # synthetic images, normalized space
    t = teacher(x)   (BN input statistics recorded), s = student(x)
    G step:  minimize L_G(t, s, y, BN stats)      # through teacher and student; only G's params
    S step:  s = student(x.detach());  minimize L_S(t.detach(), s)      (not in warm-up epochs)

``L_G`` and ``L_S`` are in :mod:`granq_ao.zsq.losses`. The teacher is frozen; the student is a
GranQ fake-quantized QAT copy with frozen BN statistics, used in eval mode as in the official code
(through its toolchain's :class:`~granq_ao.student_protocol.StudentProtocol`). Optimizers:
Adam(lr_g, betas (0.5, 0.999)) for G, SGD (nesterov, momentum 0.9, weight decay 1e-4) for the
student; both learning rates are multiplied by ``lr_decay`` at each milestone epoch.

Data parallel: each process generates its share of the batch; the student is wrapped in
``DistributedDataParallel`` (gradients averaged); the generator's gradients are all-reduced
(averaged) by hand before each Adam step, so its parameters stay identical on every process.
Batch-dependent statistics (the generator's BatchNorm, the teacher BN-statistics loss,
per-tensor/per-channel activation ranges) are computed per process, as in DDP without SyncBN.

:class:`ZSQAlgorithm` holds the models and optimizers and knows nothing of files: its
:meth:`~ZSQAlgorithm.train_epoch` returns the epoch's mean losses, and
:meth:`~ZSQAlgorithm.state_dict` / :meth:`~ZSQAlgorithm.load_state_dict` are what a checkpoint
keeps of it.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from granq_ao.student_protocol import StudentProtocol

from .config import ZSQConfig
from .distributed import DistributedContext
from .losses import gdfq_generator_loss, generator_loss, record_batchnorm_inputs, student_loss
from .options import RunOptions

__all__ = ["ZSQAlgorithm", "EpochStats", "PHASES", "lr_at_epoch", "seed_for", "local_batch_size", "format_duration"]

# The steps of one iteration, in order (ZSQAlgorithm.train_step's on_phase names).
PHASES = ("generate", "teacher_forward", "student_forward", "generator_step", "student_step")


def lr_at_epoch(base_lr: float, epoch: int, milestones: Sequence[int], decay: float) -> float:
    """``base_lr * decay ** (number of milestones <= epoch)`` (epochs counted from 0)."""
    return base_lr * decay ** sum(1 for milestone in milestones if epoch >= milestone)


def seed_for(seed: int, epoch: int, rank: int) -> int:
    """A 63-bit seed for the latent/label stream of (run seed, epoch, process rank)."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(rank)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def local_batch_size(config: ZSQConfig, world_size: int) -> int:
    """The images each of ``world_size`` processes generates per iteration (``ValueError`` unless
    ``config.batch_size`` divides evenly)."""
    if config.batch_size % world_size:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {world_size} "
                         f"processes; each process generates batch_size / world_size images")
    return config.batch_size // world_size


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


def _no_phase(name: str) -> None:
    pass


def _progress_bar(iterable, **kwargs):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar(iterable)
    return tqdm(iterable, **kwargs)


@dataclass
class EpochStats:
    """One epoch of training: its learning rates, warm-up or not, the mean of every step metric
    over iterations and processes, and the wall time of the training loop."""

    epoch: int
    lr: float
    lr_g: float
    warmup: bool
    means: Dict[str, float]
    train_time_s: float


class ZSQAlgorithm:
    """The generator/student game (module docstring) on this process's models.

    Args:
        config: the run's :class:`~granq_ao.zsq.config.ZSQConfig` (schedule, losses, optimizers).
        teacher: the frozen teacher, on ``context.device``.
        student, protocol: the student, on the device, and its toolchain's protocol.
        generator: the conditional generator ``G(z, labels)`` with ``sample_inputs``, on the device.
        context: the process group (one process by default).
        options: run-time options (``amp``, ``channels_last`` as they apply on the device; ``progress``).

    The step methods (:meth:`generate`, :meth:`teacher_forward`, :meth:`student_forward`,
    :meth:`generator_step`, :meth:`student_step`) are what :meth:`train_step` runs, in that order.
    """

    def __init__(self, config: ZSQConfig, teacher: nn.Module, student: nn.Module, protocol: StudentProtocol,
                 generator: nn.Module, context: DistributedContext, options: RunOptions = RunOptions()) -> None:
        self.config, self.ctx, self.options = config, context, options
        self.teacher, self.student, self.protocol, self.generator = teacher, student, protocol, generator
        self.device = context.device
        self.local_batch = local_batch_size(config, context.world_size)
        self.optimizer_g = torch.optim.Adam(generator.parameters(), lr=config.lr_generator,
                                            betas=tuple(config.generator_betas))
        self.optimizer_s = torch.optim.SGD(student.parameters(), lr=config.lr, momentum=config.momentum,
                                           weight_decay=config.weight_decay, nesterov=True)
        self.student_ddp: nn.Module = student

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint keeps: the generator's and student's weights and both optimizers."""
        return {"generator": self.generator.state_dict(), "student": self.student.state_dict(),
                "optimizer_g": self.optimizer_g.state_dict(), "optimizer_s": self.optimizer_s.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.student.load_state_dict(state["student"])
        self.optimizer_g.load_state_dict(state["optimizer_g"])
        self.optimizer_s.load_state_dict(state["optimizer_s"])

    def distribute(self) -> None:
        """Call once the weights are final (after a checkpoint is loaded): data parallel, the
        generator is broadcast from process 0 and the student wrapped in DDP; ``channels_last``
        puts teacher and student in NHWC."""
        if self.ctx.distributed:
            for tensor in list(self.generator.parameters()) + list(self.generator.buffers()):
                dist.broadcast(tensor.data, src=0)
            self.student_ddp = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False)
        if self.options.channels_last:
            self.teacher.to(memory_format=torch.channels_last)
            self.student.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------ the steps of one iteration
    def _autocast(self):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.options.amp)

    def generate(self, sampler: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(labels, images)``: this process's share of the batch from ``sampler``'s stream."""
        z, labels = self.generator.sample_inputs(self.local_batch, sampler, self.device)
        with self._autocast():
            images = self.generator(z, labels)
        if self.options.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return labels, images

    def teacher_forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, List[Any]]:
        """``(float32 logits, BN input records)`` of the teacher on ``images``."""
        with self._autocast():
            with record_batchnorm_inputs(self.teacher) as bn_records:
                logits = self.teacher(images)
        return logits.float(), bn_records

    def student_forward(self, images: torch.Tensor) -> torch.Tensor:
        """float32 logits of the plain student module (no DDP hooks on the generator's backward)."""
        with self._autocast():
            logits = self.student(images)
        return logits.float()

    def generator_step(self, labels: torch.Tensor, teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                       bn_records: List[Any]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``L_G`` and one Adam step of the generator (gradients averaged over processes);
        returns ``(loss_g, its parts)``."""
        cfg = self.config
        if cfg.generator_loss == "gdfq":
            loss_g, parts = gdfq_generator_loss(teacher_logits, labels, bn_records, cfg.gamma, cfg.bns_standardized)
        else:
            loss_g, parts = generator_loss(teacher_logits, student_logits, labels, bn_records, cfg.alpha_ds,
                                           cfg.alpha_as, cfg.beta, cfg.gamma, cfg.entropy_lower, cfg.entropy_upper,
                                           cfg.bns_standardized)
        generator_params = [p for p in self.generator.parameters() if p.requires_grad]
        self.optimizer_g.zero_grad(set_to_none=True)
        loss_g.backward(inputs=generator_params)
        if self.ctx.distributed:
            for parameter in generator_params:
                dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
                parameter.grad.div_(self.ctx.world_size)
        self.optimizer_g.step()
        return loss_g, parts

    def student_step(self, images: torch.Tensor, teacher_logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``L_S`` on the detached images and one SGD step of the student (DDP-averaged);
        returns ``(loss_s, student logits)``."""
        with self._autocast():
            student_logits = self.student_ddp(images.detach()).float()
        loss_s = student_loss(self.config.student_loss, teacher_logits, student_logits, self.config.temperature)
        self.optimizer_s.zero_grad(set_to_none=True)
        loss_s.backward()
        self.optimizer_s.step()
        return loss_s, student_logits

    def train_step(self, sampler: torch.Generator, train_student: bool,
                   on_phase: Optional[Callable[[str], None]] = None) -> Dict[str, float]:
        """One iteration (module docstring); ``train_student=False`` (warm-up) leaves the student
        unchanged. Returns the step's losses and agreement rates. ``on_phase(name)`` is called
        after each of :data:`PHASES` (a profiler's timer; nothing is synchronized)."""
        mark = on_phase or _no_phase
        labels, images = self.generate(sampler)
        mark("generate")
        teacher_logits, bn_records = self.teacher_forward(images)
        mark("teacher_forward")
        student_logits = self.student_forward(images)
        mark("student_forward")
        loss_g, parts = self.generator_step(labels, teacher_logits, student_logits, bn_records)
        mark("generator_step")
        teacher_logits = teacher_logits.detach()
        if train_student:
            loss_s, student_logits = self.student_step(images, teacher_logits)
        else:  # warm-up: the student is unchanged, its logits on x are those computed above
            loss_s = student_loss(self.config.student_loss, teacher_logits, student_logits.detach(),
                                  self.config.temperature)
        mark("student_step")
        student_logits = student_logits.detach()
        return {
            "loss_g": float(loss_g.detach()), "loss_s": float(loss_s.detach()),
            **{f"loss_g_{name}": float(value) for name, value in parts.items()},
            "gen_teacher_acc": float((teacher_logits.argmax(1) == labels).float().mean()),
            "gen_student_agree": float((student_logits.argmax(1) == teacher_logits.argmax(1)).float().mean()),
        }

    # ------------------------------------------------------------------ the epoch loop
    def start_epoch(self, epoch: int) -> Tuple[float, float, torch.Generator]:
        """Learning rates of ``epoch`` (0-based) set in both optimizers, models in their training
        modes (generator train, student eval: BN frozen, fake-quants on, as the official code);
        returns ``(lr_s, lr_g, the epoch's latent sampler)``."""
        cfg = self.config
        lr_s = lr_at_epoch(cfg.lr, epoch, cfg.lr_milestones, cfg.lr_decay)
        lr_g = lr_at_epoch(cfg.lr_generator, epoch, cfg.lr_milestones, cfg.lr_decay)
        for group in self.optimizer_s.param_groups:
            group["lr"] = lr_s
        for group in self.optimizer_g.param_groups:
            group["lr"] = lr_g
        sampler = torch.Generator(device=self.device)
        sampler.manual_seed(seed_for(cfg.seed, epoch, self.ctx.rank))
        self.generator.train()
        self.protocol.set_training(self.student, False)
        return lr_s, lr_g, sampler

    def train_epoch(self, epoch: int) -> EpochStats:
        """``config.iters_per_epoch`` iterations of epoch ``epoch`` (0-based; warm-up epochs train
        the generator only); ``FloatingPointError`` on a non-finite mean loss, ``RuntimeError``
        when data-parallel replicas diverged."""
        cfg = self.config
        lr_s, lr_g, sampler = self.start_epoch(epoch)
        warmup = epoch < cfg.warmup_epochs
        show = self.options.progress if self.options.progress is not None else sys.stderr.isatty()
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
        self.check_replicas()
        return EpochStats(epoch, lr_s, lr_g, warmup, means, train_time)

    def check_replicas(self) -> None:
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
