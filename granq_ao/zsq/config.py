"""The options of a zero-shot QAT run that define what it computes: :class:`ZSQConfig`.

Saved in checkpoints, config.json and results.json; a resumed run must bring the same ones
(``epochs`` may grow). Run-time choices that do not change the numbers are
:class:`~granq_ao.zsq.options.RunOptions`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Tuple

from granq_ao.config import GranQScheme

from .losses import GENERATOR_LOSSES, STUDENT_LOSSES
from .student import check_student_options

__all__ = ["ZSQConfig"]


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
    bns_standardized: bool = False        # BN-statistics loss in units of the running std (not the paper's)
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
        if not isinstance(self.bns_standardized, bool):
            problems.append(f"bns_standardized must be True or False, got {self.bns_standardized!r}")
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
