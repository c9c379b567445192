"""Checks that refuse a zero-shot run before any training, in one line each.

* :func:`check_teacher_batchnorm`: the generator's BN-statistics loss ``gamma * L_BNS`` matches the
  teacher's BatchNorm running statistics; a teacher without BatchNorm (LayerNorm networks: ConvNeXt,
  ViT) has none, so the run is refused unless ``gamma == 0`` (the generator game without that term).
* :func:`check_activation_quantizers`: a placement that finds no activation to quantize (the paper's
  ReLU outputs in a SiLU/Hardswish/GELU network) would make a "W4A4" run quantize only the weights.
"""
from __future__ import annotations

from typing import Mapping

from torch import nn

__all__ = ["has_batchnorm", "check_teacher_batchnorm", "check_activation_quantizers"]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` holds a BatchNorm layer with running statistics (any ``_BatchNorm``:
    1d/2d/3d, SyncBatchNorm, lazy; ``track_running_stats=False`` layers have nothing to match)."""
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
               for module in model.modules())


def check_teacher_batchnorm(teacher: nn.Module, gamma: float) -> None:
    """``ValueError`` when ``gamma > 0`` and ``teacher`` has no BatchNorm layer with running
    statistics (module docstring)."""
    if gamma > 0 and not has_batchnorm(teacher):
        untracked = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in teacher.modules())
        what = ("BatchNorm layer with running statistics (its BatchNorm layers have track_running_stats=False)"
                if untracked else "BatchNorm layer")
        raise ValueError(
            f"the teacher ({type(teacher).__name__}) has no {what}, so the generator's BN-statistics "
            f"loss (gamma={gamma:g}) has nothing to match; pass gamma=0 (--gamma 0) to train the generator "
            f"without it (docs/ZSQ.md says what that costs)")


def check_activation_quantizers(counts: Mapping[str, int], placement: str, teacher_name: str = "the teacher") -> None:
    """``ValueError`` when a built student has no activation quantizer (``counts["activation"] == 0``)."""
    if counts.get("activation", 0) == 0:
        suggestion = "act_placement='inputs' (--act-placement inputs: the input of every conv/linear)"
        raise ValueError(
            f"act_placement={placement!r} finds no activation to quantize in {teacher_name} "
            f"(weights only: {counts.get('weight', 0)} quantizers); use {suggestion}")
