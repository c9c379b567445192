"""Run-time options of a zero-shot run: how it runs, not what it computes.

None of them is part of the run's config (:class:`~granq_ao.zsq.config.ZSQConfig`). Those a run
is made of (:attr:`RunOptions.SAVED`: evaluation cadence, fake-quant path, files, CUDA autocast and
memory format) are saved with its checkpoint, so that ``--resume`` continues with them unless told
otherwise; only ``amp`` may not change on resume (it changes what the training computes, not just
its rounding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch

__all__ = ["RunOptions", "options_changes"]


@dataclass(frozen=True)
class RunOptions:
    """The run-time choices of :class:`~granq_ao.zsq.trainer.ZSQTrainer` (its keyword arguments of
    the same names set them).

    Attributes:
        tensorboard: write TensorBoard logs (``tb/``) when there is an output folder.
        progress: a progress bar per epoch (``None``: when stderr is a terminal; process 0 only).
        log: where the run's lines go (process 0 only).
        fused: the fake-quant path (``"auto"``, ``"compiled"``, ``"eager"``); same numbers.
        seed_rng: seed torch's and NumPy's global generators with ``config.seed`` before the
            student and the generator are built. ``False`` when the caller did that itself
            before building the teacher (the recipes do: the teacher's construction is then part
            of the seeded stream).
        pictures: draw the run's pictures (:mod:`granq_ao.zsq.pictures`) into the output folder
            and TensorBoard (process 0).
        amp: CUDA only (ignored, with a note, elsewhere): the training forward passes under
            bfloat16 autocast (the fake-quant math, the losses and evaluation stay float32, but the
            logits keep bfloat16's ~3 significant digits, which coarsens ``t - s``).
        channels_last: CUDA only: teacher, student and generated images in NHWC memory format.
        eval_every: evaluate the student after every ``eval_every``-th epoch and always after the
            last (default 1: every epoch); the training is the same.
    """

    tensorboard: bool = True
    progress: Optional[bool] = None
    log: Callable[[str], None] = print
    fused: Any = "auto"
    seed_rng: bool = True
    pictures: bool = True
    amp: bool = False
    channels_last: bool = False
    eval_every: int = 1

    # The options saved with a run's checkpoint and restored by ``--resume`` (module docstring).
    SAVED = ("eval_every", "fused", "tensorboard", "pictures", "amp", "channels_last")
    # Saved options a resumed run must keep: they change what is computed, not only its rounding.
    FIXED_ON_RESUME = ("amp",)

    def __post_init__(self) -> None:
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 1:
            raise ValueError(f"eval_every must be a positive integer, got {self.eval_every!r}")

    def saved(self) -> Dict[str, Any]:
        """The :attr:`SAVED` options as plain data (a ``fused`` that is not a mode name is left out)."""
        values = {name: getattr(self, name) for name in self.SAVED}
        if not isinstance(values["fused"], str):
            del values["fused"]
        return values

    def cuda_only_ignored(self, device: torch.device) -> List[str]:
        """The CUDA-only options asked for that ``device`` ignores."""
        return [name for name in ("amp", "channels_last") if getattr(self, name) and device.type != "cuda"]

    def on(self, device: torch.device) -> "RunOptions":
        """These options as they apply on ``device`` (the CUDA-only ones off elsewhere)."""
        on_cuda = device.type == "cuda"
        return RunOptions(**{**self.__dict__, "amp": bool(self.amp) and on_cuda,
                             "channels_last": bool(self.channels_last) and on_cuda})


def options_changes(saved: Dict[str, Any], now: RunOptions) -> Dict[str, tuple]:
    """``{name: (saved value, value now)}`` for the saved options (:meth:`RunOptions.saved` of the
    run that wrote a checkpoint) that differ now; options the checkpoint lacks are not compared."""
    current = now.saved()
    return {name: (saved[name], current[name]) for name in RunOptions.SAVED
            if name in saved and name in current and saved[name] != current[name]}
