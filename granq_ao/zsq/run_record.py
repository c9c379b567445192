"""The record of a zero-shot run: its folder, checkpoint, resume checks, files, TensorBoard, pictures.

:class:`RunRecord` keeps the run's ``state`` (epochs done, metrics history, wall time, the
accuracy entries, the activation errors drawn) and writes it, on process 0 when there is an
output folder, as:

* ``config.json`` (config, run_info, world size, device, versions) at each start;
* ``checkpoint.pt`` after every epoch (atomic): the algorithm's weights and optimizers, the RNG
  state, ``state`` and the saved run options (:meth:`RunOptions.saved`); a resumed run must bring
  the same config (``epochs`` may grow), the same non-descriptive ``run_info``, the same number of
  processes and the same ``amp``; another evaluation cadence or fake-quant path is noted in the log;
* ``metrics.jsonl`` (one JSON line per epoch, rewritten from ``state``), ``tb/`` (TensorBoard);
* ``student_final.pt`` and ``results.json`` at the end, and the pictures
  (:class:`~granq_ao.zsq.pictures.RunPictures`).

It knows the algorithm only through what it saves and restores
(:meth:`~granq_ao.zsq.algorithm.ZSQAlgorithm.state_dict` / ``load_state_dict``) and the models
the pictures draw.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from torch import nn

from granq_ao.student_protocol import StudentProtocol

from .algorithm import format_duration
from .checkpoint import atomic_torch_save, atomic_write, atomic_write_json, load_checkpoint, rng_state, set_rng_state
from .config import ZSQConfig
from .distributed import DistributedContext
from .evaluation import format_accuracy
from .machine import kernel_changes, kernel_signature, same_kernels
from .options import RunOptions, options_changes
from .results import versions

__all__ = ["RunRecord", "eta_seconds", "eta_text", "CHECKPOINT_NAME", "CHECKPOINT_FORMAT", "RESUMABLE_CHANGES", "check_resumable",
           "refuse_finished_folder", "epoch_line"]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 2
# Config fields that may differ between a checkpoint and the run that resumes it.
RESUMABLE_CHANGES = ("epochs",)
# run_info entries that only describe where things came from (paths may move between sessions).
DESCRIPTIVE_INFO = ("teacher", "eval", "teacher_weights", "data_root")
STATE_KEYS = ("epoch", "history", "elapsed_s", "teacher", "pre_qat", "last")
PICTURE_KEYS = ("activation_error_pre_qat", "activation_error_final")


def refuse_finished_folder(out_dir: os.PathLike) -> None:
    """``FileExistsError`` when ``out_dir`` already holds a run (its checkpoint): a new run there
    would replace it; resume it or choose another folder."""
    if (Path(out_dir) / CHECKPOINT_NAME).exists():
        raise FileExistsError(f"{out_dir} already holds a run ({CHECKPOINT_NAME}); pass --resume to "
                              f"continue it, or choose another --out")


def check_resumable(checkpoint: Dict[str, Any], config: ZSQConfig, run_info: Dict[str, Any],
                    world_size: int) -> None:
    """``ValueError`` unless a run with ``config``, ``run_info`` and ``world_size`` processes may
    continue ``checkpoint`` (module docstring). A config field the checkpoint lacks (added later)
    counts as its default."""
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint format {checkpoint.get('format')!r} is not {CHECKPOINT_FORMAT}")
    saved = checkpoint["config"]
    current = config.to_dict()
    defaults = ZSQConfig().to_dict()
    changed = [f"{k}: checkpoint {saved.get(k, defaults[k])!r} != now {current[k]!r}" for k in current
               if k not in RESUMABLE_CHANGES and saved.get(k, defaults[k]) != current[k]]
    saved_info = checkpoint.get("run_info", {})
    changed += [f"{k}: checkpoint {saved_info.get(k)!r} != now {v!r}" for k, v in run_info.items()
                if k not in DESCRIPTIVE_INFO and saved_info.get(k) != v]
    if changed:
        raise ValueError("cannot resume with a different configuration: " + "; ".join(changed))
    if checkpoint.get("world_size", 1) != world_size:
        raise ValueError(f"the checkpoint was written by a run with {checkpoint.get('world_size', 1)} "
                         f"process(es); resume it with the same number (now {world_size})")


def eta_seconds(history: Sequence[Dict[str, Any]], config: ZSQConfig, eval_every: int, overhead_s: float = 0.0
                ) -> float:
    """Seconds left after the last epoch of ``history``: for each remaining epoch,
    ``iters_per_epoch x s/iter`` of its phase (median of that phase's last 5 epochs, so that one
    epoch slowed by other work barely moves it; the other phase's while a phase has none yet) +
    ``overhead_s`` (files, pictures), plus the median of the last 3 measured evaluation times for
    each remaining epoch that evaluates (every ``eval_every``-th and the last)."""
    done = history[-1]["epoch"] if history else 0
    rates: Dict[str, float] = {}
    for phase in ("warmup", "qat"):
        recent = [row["s_per_iter"] for row in history if row["phase"] == phase][-5:]
        if recent:
            rates[phase] = statistics.median(recent)
    if not rates:
        return float("nan")
    evaluations = [row["eval_time_s"] for row in history if row.get("eval_time_s") is not None][-3:]
    eval_s = statistics.median(evaluations) if evaluations else 0.0
    total = 0.0
    for epoch in range(done + 1, config.epochs + 1):  # 1-based
        phase = "warmup" if epoch <= config.warmup_epochs else "qat"
        total += config.iters_per_epoch * rates.get(phase, next(iter(rates.values()))) + overhead_s
        if epoch % eval_every == 0 or epoch == config.epochs:
            total += eval_s
    return total


def eta_text(history: Sequence[Dict[str, Any]], config: ZSQConfig, eval_every: int, overhead_s: float = 0.0) -> str:
    """:func:`eta_seconds` as the log shows it. While the QAT epochs still to come have no measured
    rate (during the warm-up) the warm-up's stands in for it, and a QAT iteration (generator and
    student steps) costs more than a warm-up one (generator only): the ETA is then a lower bound,
    shown as ``>HH:MM:SS (QAT rate not measured yet)``."""
    text = format_duration(eta_seconds(history, config, eval_every, overhead_s))
    done = history[-1]["epoch"] if history else 0
    qat_left = config.epochs > max(done, config.warmup_epochs)
    if history and qat_left and not any(row["phase"] == "qat" for row in history):
        return f">{text} (QAT rate not measured yet)"
    return text


def epoch_line(config: ZSQConfig, row: Dict[str, Any], test: Optional[Dict[str, Any]], eta: str) -> str:
    """The log line of one epoch's metrics ``row``."""
    second_term = f"ce {row['loss_g_ce']:.3f}" if config.generator_loss == "gdfq" else f"margin {row['loss_g_margin']:.3f}"
    return (f"epoch {row['epoch']:>3}/{config.epochs} {row['phase']:<6} lr {row['lr']:.2g} | L_G {row['loss_g']:.4f} "
            f"(bns {row['loss_g_bns']:.4f}, {second_term}) | L_S {row['loss_s']:.4f} "
            + (f"| test {format_accuracy(test)} " if test is not None else "")
            + f"| {row['s_per_iter']:.2f} s/iter | ETA {eta}")


class RunRecord:
    """The files and state of one run (module docstring). ``out_dir=None``: nothing is written
    and nothing can be resumed. ``resume``: the checkpoint in ``out_dir`` is read and checked now
    (``FileNotFoundError`` / ``ValueError``) and restored by :meth:`restore`."""

    def __init__(self, config: ZSQConfig, run_info: Dict[str, Any], out_dir: Optional[os.PathLike],
                 context: DistributedContext, options: RunOptions = RunOptions(), resume: bool = False) -> None:
        self.config, self.run_info, self.ctx, self.options = config, run_info, context, options
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.state: Dict[str, Any] = {"epoch": 0, "history": [], "elapsed_s": 0.0}
        self.checkpoint: Optional[Dict[str, Any]] = None
        self.writer = None
        self.pictures = None
        self._clock = time.time()
        if self.out_dir is None:
            if resume:
                raise ValueError("resume needs an out_dir holding the run's checkpoint")
            return
        path = self.out_dir / CHECKPOINT_NAME
        if not resume:
            refuse_finished_folder(self.out_dir)
            return
        if not path.is_file():
            raise FileNotFoundError(f"nothing to resume: {path} does not exist")
        self.checkpoint = load_checkpoint(path)
        check_resumable(self.checkpoint, config, run_info, context.world_size)
        self._check_options(self.checkpoint.get("options"))

    def _check_options(self, saved: Optional[Dict[str, Any]]) -> None:
        """Resume: ``ValueError`` when an option fixed on resume (``amp``) differs from the
        checkpoint's; a note for the others that differ, or that a checkpoint written before options were
        saved holds none (the ones given now apply)."""
        if saved is None:
            self.log("note     : the checkpoint holds no run options (written before they were saved): this run "
                     f"continues with the ones given now (eval_every {self.options.eval_every}, pictures "
                     f"{self.options.pictures}, tensorboard {self.options.tensorboard})")
            return
        changes = options_changes(saved, self.options)
        fixed = {name: change for name, change in changes.items() if name in RunOptions.FIXED_ON_RESUME}
        if fixed:
            raise ValueError("cannot resume with other options: " + "; ".join(
                f"{name}: checkpoint {old!r} != now {new!r}" for name, (old, new) in fixed.items()))
        if changes:
            self.log("note     : resumed with other run options than the checkpoint's ("
                     + ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changes.items())
                     + "); the training computes the same")

    @property
    def writes_files(self) -> bool:
        return self.ctx.is_main and self.out_dir is not None

    @property
    def fresh(self) -> bool:
        """Whether nothing has been measured yet (a new run, not a resumed one)."""
        return self.state["epoch"] == 0 and "teacher" not in self.state

    def log(self, message: str) -> None:
        if self.ctx.is_main:
            self.options.log(message)

    # ------------------------------------------------------------------ checkpoint
    def restore(self, load_algorithm: Callable[[Dict[str, Any]], None]) -> None:
        """Resume: the algorithm's weights and optimizers (``load_algorithm(checkpoint)``), the RNG
        state and ``state`` from the checkpoint read at construction (nothing without one)."""
        checkpoint = self.checkpoint
        if checkpoint is None:
            return
        load_algorithm(checkpoint)
        set_rng_state(checkpoint["rng"])
        self.state = {key: checkpoint[key] for key in STATE_KEYS}
        self.state.update({key: checkpoint[key] for key in PICTURE_KEYS if key in checkpoint})
        self.state["machines"] = list(checkpoint.get("machines", []))
        self.state["sessions"] = list(checkpoint.get("sessions", []))

    def save_checkpoint(self, algorithm_state: Dict[str, Any]) -> None:
        if not self.writes_files:
            return
        checkpoint = {"format": CHECKPOINT_FORMAT, "config": self.config.to_dict(), "run_info": self.run_info,
                      "world_size": self.ctx.world_size, "options": self.options.saved(), **algorithm_state,
                      "rng": rng_state(), **self.state}
        atomic_torch_save(checkpoint, self.out_dir / CHECKPOINT_NAME)

    # ------------------------------------------------------------------ the run's files
    def start(self, device: Any) -> None:
        """At each start: the clock, the machine (:meth:`note_machine`), ``config.json``."""
        self._clock = time.time()
        self.note_machine()
        if self.writes_files:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json({"config": self.config.to_dict(), "run_info": self.run_info,
                               "options": self.options.saved(), "world_size": self.ctx.world_size,
                               "device": str(device), "versions": versions()},
                              self.out_dir / "config.json")

    def note_machine(self) -> None:
        """Record this session's start in ``state["sessions"]`` (from which epoch, CPU, date), and
        append its :func:`~granq_ao.zsq.machine.kernel_signature` to ``state["machines"]``
        when it differs from the last one (a run continued on another CPU model or kernel setting),
        and say that the run is then no longer bit-identical to an uninterrupted one."""
        signature = kernel_signature()
        self.state.setdefault("sessions", []).append({"from_epoch": self.state["epoch"], "cpu": signature.get("cpu"),
                                                      "date": time.strftime("%Y-%m-%d %H:%M:%S")})
        machines = self.state.setdefault("machines", [])
        if machines and same_kernels(machines[-1]["kernels"], signature):
            return
        machines.append({"from_epoch": self.state["epoch"], "kernels": signature,
                         "date": time.strftime("%Y-%m-%d %H:%M:%S")})
        if len(machines) > 1:
            changed = ", ".join(f"{key} {old!r} -> {new!r}"
                                for key, (old, new) in kernel_changes(machines[-2]["kernels"], signature).items())
            self.log(f"note     : continuing after epoch {self.state['epoch']} on other kernels ({changed}): the run "
                     f"goes on correctly, but its numbers are not bit-identical to an uninterrupted run")

    def tick(self) -> None:
        """Add the wall time since the last tick to ``elapsed_s`` (kept across resumes)."""
        now = time.time()
        self.state["elapsed_s"] += now - self._clock
        self._clock = now

    def write_metrics(self) -> None:
        """metrics.jsonl = the history held in the checkpoint (rewritten whole, atomically)."""
        if not self.writes_files:
            return
        text = "".join(json.dumps(row) + "\n" for row in self.state["history"])
        atomic_write(self.out_dir / "metrics.jsonl", lambda handle: handle.write(text), mode="w")

    def end_epoch(self, row: Dict[str, Any], last: Optional[Dict[str, Any]], evaluated: bool,
                  algorithm_state: Callable[[], Dict[str, Any]]) -> None:
        """Epoch ``row["epoch"]`` done: its metrics row (and, when ``evaluated``, its accuracy
        entry ``last``) into ``state``, then the checkpoint (first: metrics.jsonl is rewritten from
        it on resume), metrics.jsonl and TensorBoard."""
        self.state["history"].append(row)
        if evaluated:
            self.state["last"] = last
        self.state["epoch"] = row["epoch"]
        self.tick()
        self.save_checkpoint(algorithm_state())
        self.write_metrics()
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(key, value, row["epoch"])
            self.writer.flush()

    def finish(self, results: Dict[str, Any], student: nn.Module) -> None:
        """``student_final.pt`` and ``results.json``."""
        if self.writes_files:
            atomic_torch_save(student.state_dict(), self.out_dir / "student_final.pt")
            atomic_write_json(results, self.out_dir / "results.json")

    # ------------------------------------------------------------------ TensorBoard and pictures
    def open_tensorboard(self) -> None:
        if not (self.writes_files and self.options.tensorboard):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed
            self.log("(tensorboard not installed: metrics go to metrics.jsonl only)")
            return
        self.writer = SummaryWriter(log_dir=str(self.out_dir / "tb"), purge_step=self.state["epoch"] + 1)

    def close_tensorboard(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def open_pictures(self, num_classes: int, eval_data: Any = None, normalize=None) -> None:
        """Draw pictures from now on (process 0, with an output folder, ``options.pictures``)."""
        if self.writes_files and self.options.pictures:
            from .pictures import RunPictures

            self.pictures = RunPictures(self.out_dir, self.config, self.run_info, num_classes=num_classes,
                                        eval_data=eval_data, normalize=normalize, writer=self.writer)

    def draw_start(self, student: nn.Module, protocol: StudentProtocol) -> None:
        """Before QAT: the activation errors of the untrained student, kept in ``state``."""
        if self.pictures is not None:
            self._keep("activation_error_pre_qat", self.pictures.start(student, protocol, self.state))

    def draw_epoch(self, generator: nn.Module, student: nn.Module, protocol: StudentProtocol) -> None:
        """After the epoch just recorded: accuracy, generated images, final activation errors."""
        if self.pictures is not None:
            self._keep("activation_error_final", self.pictures.epoch_end(self.state, generator, student, protocol))

    def _keep(self, key: str, errors: Optional[Dict[str, Any]]) -> None:
        if errors is not None:
            self.state[key] = errors
