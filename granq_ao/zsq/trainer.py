"""Zero-shot quantization-aware training of any teacher: :class:`ZSQTrainer`.

Two pieces with a narrow interface, put together here:

* the algorithm (:class:`~granq_ao.zsq.algorithm.ZSQAlgorithm`): AdaDFQ's generator/student game
  with a GranQ student (generator step, student step, epoch loop), data parallel under torchrun;
* the run record (:class:`~granq_ao.zsq.run_record.RunRecord`): checkpoint save/load and resume
  checks, config.json / metrics.jsonl / results.json, TensorBoard, the pictures.

The record sees the algorithm only through ``state_dict`` / ``load_state_dict`` and the models
its pictures draw; the algorithm writes nothing. After every epoch the student is evaluated on
real test images (every ``eval_every`` epochs and after the last) and a checkpoint is written
atomically; the reported accuracy is the final epoch's. Only process 0 writes files.
"""
from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from .algorithm import ZSQAlgorithm, format_duration, local_batch_size, lr_at_epoch, seed_for
from .config import ZSQConfig
from .distributed import DistributedContext
from .evaluation import accuracy_entry, check_eval_data, describe_eval_data, format_accuracy, per_image_correct
from .generator import GDFQGenerator
from .preflight import check_activation_quantizers, check_teacher_batchnorm
from .options import RunOptions
from .results import run_results
from .run_record import (CHECKPOINT_FORMAT, CHECKPOINT_NAME, RESUMABLE_CHANGES, RunRecord, epoch_line,
                         eta_seconds, eta_text, refuse_finished_folder)
from .student import student_protocol

__all__ = ["ZSQConfig", "RunOptions", "DistributedContext", "ZSQTrainer", "lr_at_epoch", "seed_for", "CHECKPOINT_NAME",
           "CHECKPOINT_FORMAT", "RESUMABLE_CHANGES", "refuse_finished_folder", "seed_everything", "format_duration"]


def seed_everything(seed: int) -> None:
    """Seed torch's (CPU and CUDA) and NumPy's global generators with ``seed``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def _check_task(teacher: nn.Module, num_classes: int, image_size: int, channels: int, eval_data: Any) -> None:
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
    for name, value in (("num_classes", num_classes), ("image_size", image_size), ("channels", channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if eval_data is not None:
        check_eval_data(eval_data)


class ZSQTrainer:
    """Zero-shot QAT of ``teacher`` (any classifier ``nn.Module``) with ``config``.

    Args:
        config: the run's :class:`~granq_ao.zsq.config.ZSQConfig`.
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
        context: the process group (default: one process, CPU).
        resume: continue the run saved in ``out_dir``.
        options: run-time choices (:class:`~granq_ao.zsq.options.RunOptions`), not part of the
            config; its fields may also be given as keywords (``tensorboard``, ``progress``,
            ``log``, ``fused``, ``seed_rng``, ``pictures``, ``amp``, ``channels_last``,
            ``eval_every``), which override ``options``.

    Attributes: ``algorithm`` and ``record`` (the two pieces), ``state`` (the record's),
    ``teacher``, ``student``, ``generator``, ``protocol`` (the student's toolchain protocol),
    ``fake_quants`` (its quantizer counts), ``optimizer_g``, ``optimizer_s``.

    Files in ``out_dir`` (process 0 only): ``config.json``, ``checkpoint.pt`` (after every epoch,
    atomic), ``metrics.jsonl`` (one JSON line per epoch), ``tb/`` (TensorBoard, when installed and
    ``tensorboard=True``), ``student_final.pt`` and ``results.json`` at the end, and the pictures
    (``accuracy.png``, ``generated_epochNNN.png``, ``activation_error.png``/``.json``).
    """

    def __init__(self, config: ZSQConfig, teacher: nn.Module, out_dir: Optional[os.PathLike] = None, *,
                 num_classes: int, image_size: int = 32, channels: int = 3, eval_data: Any = None,
                 normalize=None, generator: Optional[nn.Module] = None,
                 run_info: Optional[Dict[str, Any]] = None, context: Optional[DistributedContext] = None,
                 resume: bool = False, options: Optional[RunOptions] = None, **run_options: Any) -> None:
        self.config = config.validate()
        _check_task(teacher, num_classes, image_size, channels, eval_data)
        self.ctx = context or DistributedContext()
        self.device = self.ctx.device
        asked = dataclasses.replace(options or RunOptions(), **run_options)
        self._cuda_only_ignored = asked.cuda_only_ignored(self.device)
        self.options = asked.on(self.device)
        self.num_classes, self.image_size, self.channels = num_classes, image_size, channels
        self.eval_data, self.normalize = eval_data, normalize
        self.run_info = {"teacher": type(teacher).__name__,
                         "eval": describe_eval_data(eval_data) if eval_data is not None else None,
                         **(run_info or {})}
        local_batch_size(self.config, self.ctx.world_size)
        self.record = RunRecord(self.config, self.run_info, out_dir, self.ctx, self.options, resume)
        self._overheads: List[float] = []  # seconds per epoch beyond training and evaluation (the ETA's)
        self.out_dir = self.record.out_dir
        if self.options.seed_rng:
            seed_everything(self.config.seed)
        self._set_up(teacher, generator)

    def _set_up(self, teacher: nn.Module, generator: Optional[nn.Module]) -> None:
        """The one place the run is built: frozen teacher, student (its toolchain's protocol),
        generator, the algorithm; then a resumed run's checkpoint is restored into them."""
        cfg = self.config
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes; CUDA runs are not bit-reproducible anyway
        self.teacher = teacher
        self.teacher.eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.teacher.to(self.device)
        check_teacher_batchnorm(self.teacher, cfg.gamma)
        example_inputs = (torch.zeros(2, self.channels, self.image_size, self.image_size),)  # batch >= 2: torch.export
        self.protocol = student_protocol(cfg.toolchain)
        self.student = self.protocol.prepare(self.teacher, cfg.scheme(self.options.fused), example_inputs,
                                             fold_bn=cfg.fold_bn).to(self.device)
        self.fake_quants = self.protocol.count(self.student)
        check_activation_quantizers(self.fake_quants, cfg.act_placement, type(teacher).__name__)
        if generator is None:
            generator = GDFQGenerator(self.num_classes, cfg.latent_dim, img_size=self.image_size, channels=self.channels)
        self.generator = generator.to(self.device)
        self.generator.train()
        self.algorithm = ZSQAlgorithm(cfg, self.teacher, self.student, self.protocol, self.generator, self.ctx,
                                      self.options)
        self.record.restore(self.algorithm.load_state_dict)
        self.algorithm.distribute()

    # ------------------------------------------------------------------ the pieces' public faces
    @property
    def state(self) -> Dict[str, Any]:
        return self.record.state

    @property
    def optimizer_g(self) -> torch.optim.Optimizer:
        return self.algorithm.optimizer_g

    @property
    def optimizer_s(self) -> torch.optim.Optimizer:
        return self.algorithm.optimizer_s

    @property
    def local_batch(self) -> int:
        return self.algorithm.local_batch

    @property
    def writes_files(self) -> bool:
        return self.record.writes_files

    def log(self, message: str) -> None:
        self.record.log(message)

    def train_step(self, sampler: torch.Generator, train_student: bool) -> Dict[str, float]:
        """One iteration of the algorithm (:meth:`ZSQAlgorithm.train_step`)."""
        return self.algorithm.train_step(sampler, train_student)

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

    # ------------------------------------------------------------------ the run
    def run(self, stop_after_epochs: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """Train until ``config.epochs`` (or stop after ``stop_after_epochs`` epochs of this call,
        returning None: a simulated interruption). Returns the results dict (see results.json)."""
        record = self.record
        self._start()
        epochs_this_call = 0
        try:
            while self.state["epoch"] < self.config.epochs:
                if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs:
                    return None
                self._epoch(self.state["epoch"])
                epochs_this_call += 1
        finally:
            record.close_tensorboard()
        record.tick()
        results = run_results(self.state, self.config, self.run_info, self.fake_quants, self.ctx.world_size,
                              self.device)
        record.finish(results, self.student)
        return results

    def _start(self) -> None:
        """config.json, the header lines, the teacher's and pre-QAT accuracies (a fresh run),
        metrics.jsonl, TensorBoard, the pictures."""
        cfg, record = self.config, self.record
        record.start(self.device)
        self.log(f"teacher  : {self.run_info['teacher']}")
        self.log(f"student  : W{cfg.weight_bits}A{cfg.act_bits} act {cfg.act_granularity} ({cfg.act_placement} "
                 f"placement), weights {cfg.weight_granularity}, {cfg.toolchain}; fake-quants {self.fake_quants}")
        self.log(f"eval     : {self.run_info['eval'] or 'none (no accuracy is measured)'}")
        if self._cuda_only_ignored:
            self.log(f"note     : {', '.join(self._cuda_only_ignored)} ignored on {self.device.type} (CUDA only)")
        fresh = record.fresh
        if fresh:
            self.state["teacher"] = self.evaluate(self.teacher)
            self.state["pre_qat"] = self.evaluate(self.student)
            self.state["last"] = self.state["pre_qat"]
        else:
            self.log(f"resuming after epoch {self.state['epoch']} of {cfg.epochs}")
        if self.eval_data is not None:
            self.log(f"teacher accuracy {format_accuracy(self.state['teacher'])}; "
                     f"W{cfg.weight_bits}A{cfg.act_bits} before QAT {format_accuracy(self.state['pre_qat'])}")
        record.write_metrics()
        record.open_tensorboard()
        record.open_pictures(self.num_classes, self.eval_data, self.normalize)
        if fresh:
            record.draw_start(self.student, self.protocol)

    def _epoch(self, epoch: int) -> None:
        """Train epoch ``epoch`` (0-based), evaluate when due, record it, draw, log."""
        cfg = self.config
        start = time.time()
        stats = self.algorithm.train_epoch(epoch)
        evaluate_now = (epoch + 1) % self.options.eval_every == 0 or epoch + 1 == cfg.epochs
        eval_start = time.time()
        test = self.evaluate(self.student) if evaluate_now else None
        row = {"epoch": epoch + 1, "phase": "warmup" if stats.warmup else "qat", "lr": stats.lr, "lr_g": stats.lr_g,
               **stats.means, "train_time_s": stats.train_time_s, "s_per_iter": stats.train_time_s / cfg.iters_per_epoch,
               "eval_time_s": time.time() - eval_start if evaluate_now else None}
        if test is not None:
            row.update({"test_acc": test["acc"], "test_correct": test["correct"], "n_test": test["n"],
                        "test_ci95_low": test["ci95"][0], "test_ci95_high": test["ci95"][1]})
        # Files and pictures per epoch: the median of this process's last 5 epochs, leaving out its
        # first epoch once there is another (it also pays one-off costs: lazy imports, first
        # calls); 0 before any.
        steady = self._overheads[1:] or self._overheads
        overhead = statistics.median(steady[-5:]) if steady else 0.0
        eta = eta_seconds(self.state["history"] + [row], cfg, self.options.eval_every, overhead)
        row.update({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),  # when the epoch was done
                    "eta_s": None if math.isnan(eta) else eta})  # what the log says is left
        self.record.end_epoch(row, test, evaluate_now, self.algorithm.state_dict)
        self.record.draw_epoch(self.generator, self.student, self.protocol)
        self._overheads.append(time.time() - start - stats.train_time_s - (row["eval_time_s"] or 0.0))
        self.log(epoch_line(cfg, row, test, eta_text(self.state["history"], cfg, self.options.eval_every, overhead)))
