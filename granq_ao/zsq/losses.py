"""Losses of the zero-shot recipe (AdaDFQ's generator objective, GranQ's student objective).

Notation: ``t`` teacher logits, ``s`` student logits (N, C), ``y`` the generator's labels,
``H(p) = -sum_c p_c log p_c`` the entropy of a distribution, ``softmax`` over classes.

Generator (minimized by the generator only; it back-propagates through teacher and student)::

    L_G = L_margin + beta * (alpha_ds * CE(y, t - s) + alpha_as * CE(y, t + s)) + gamma * L_BNS

* ``L_BNS = 1/L * sum_l [ MSE(mu_l, running_mean_l) + MSE(var_l, running_var_l) ]`` over the L
  BatchNorm layers of the teacher; ``mu_l``, ``var_l`` are the batch mean and *biased* variance
  of the BN layer's input (over every dim but channels), MSE is the mean over channels.
  Opt-in ``standardized`` form (not the paper's), in units of each channel's running statistics,
  ``sigma^2 = running_var + 1e-5``::

      L_BNS_std = 1/L * sum_l [ MSE((mu_l - running_mean_l) / sigma_l, 0) + MSE(var_l / sigma_l^2, running_var_l / sigma_l^2) ]

  The paper's form weighs each layer by the square of its activations' scale: a teacher fed raw
  0..255 pixels (MLPerf Tiny's ResNet-8) has a stem BN variance of ~2.6e3, and its stem term alone
  is ~1.8e5 on real batches of 16 against < 1 for every other layer, so the generator objective
  is that one term. The standardized form is scale-free.
* ``CE(y, v) = mean_n -log softmax(v_n)[y_n]``.
* ``L_margin`` (AdaDFQ's "margin" hinge on the disagreement entropy), for any batch size::

      h_n   = H(softmax(t_n - s_n))
      h'_n  = (h_n - min_m h_m) / (log C - min_m h_m)        (min over the batch; log C = max entropy)
      L_margin = mean_n max(lambda_l - h'_n, 0) + mean_n max(h'_n - lambda_u, 0)

  with ``lambda_l = 0.1``, ``lambda_u = 0.8``. The batch minimum is part of the graph (its
  gradient flows, as in the official code); the denominator is clamped at 1e-12 (all-uniform
  batch). The official code compares against a hard-coded zero vector of one batch size (16 in
  AdaDFQ's CIFAR trainer, 200 in GranQ's), which fails for any other batch size (GranQ's code at
  its own CIFAR-10 batch of 16); here the hinge is ``clamp(min=0)``.

GDFQ's generator objective (Xu et al. 2020; the "gdfq" choice, for the Table 4 comparison)::

    L_G = CE(y, t) + gamma * L_BNS                 (GDFQ's code: gamma = 0.1)

Student (GranQ/AdaDFQ, "entropy"), with temperature ``T`` (20 for CIFAR)::

    L_S = -T^2 * mean_n H(softmax((t_n - s_n) / T))

and the standard distillation alternative ("kl"): ``L_S = T^2 * mean_n KL(softmax(t_n/T) || softmax(s_n/T))``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "softmax_entropy",
    "record_batchnorm_inputs",
    "batchnorm_statistics_loss",
    "entropy_margin_loss",
    "generator_loss",
    "gdfq_generator_loss",
    "GENERATOR_LOSSES",
    "entropy_distillation_loss",
    "kl_distillation_loss",
    "student_loss",
    "STUDENT_LOSSES",
]

STUDENT_LOSSES = ("entropy", "kl")
GENERATOR_LOSSES = ("adadfq", "gdfq")


def softmax_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-row entropy ``H(softmax(logits / T))`` (natural log), shape (N,)."""
    log_p = F.log_softmax(logits / temperature, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


class BatchNormInputs(list):
    """Records ``(batch_mean, batch_var, running_mean, running_var)`` per BN call, in call order."""


@contextlib.contextmanager
def record_batchnorm_inputs(model: nn.Module) -> Iterator[BatchNormInputs]:
    """While active, every forward of a BatchNorm module of ``model`` appends the batch mean and
    biased variance of its input (over all dims but dim 1) and the layer's running statistics."""
    records = BatchNormInputs()

    def hook(module, inputs, output):
        x = inputs[0].float()  # statistics in float32 also under autocast (a no-op for float32 inputs)
        dims = [d for d in range(x.dim()) if d != 1]
        records.append((x.mean(dim=dims), x.var(dim=dims, unbiased=False),
                        module.running_mean, module.running_var))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def batchnorm_statistics_loss(records: List[Tuple[torch.Tensor, ...]], standardized: bool = False) -> torch.Tensor:
    """``1/L * sum_l MSE(mu_l, running_mean_l) + MSE(var_l, running_var_l)`` (module docstring);
    ``standardized=True``: the same in units of each channel's running standard deviation."""
    if not records:
        raise ValueError("no BatchNorm inputs were recorded: does the teacher have BatchNorm layers?")
    if standardized:
        total = sum(_standardized_terms(*record) for record in records)
    else:
        total = sum(F.mse_loss(mean, running_mean) + F.mse_loss(var, running_var)
                    for mean, var, running_mean, running_var in records)
    return total / len(records)


def _standardized_terms(mean, var, running_mean, running_var) -> torch.Tensor:
    scale = running_var.float() + 1e-5
    return (((mean - running_mean) ** 2) / scale).mean() + (((var - running_var) / scale) ** 2).mean()


def _bns_term(records: List[Tuple[torch.Tensor, ...]], gamma: float, like: torch.Tensor,
              standardized: bool = False) -> torch.Tensor:
    """The BN-statistics loss; 0 when ``gamma == 0`` and nothing was recorded (a teacher without
    BatchNorm, opted in with ``gamma=0``). With ``gamma > 0`` an empty record is an error."""
    if not records and gamma == 0:
        return like.new_zeros(())
    return batchnorm_statistics_loss(records, standardized)


def entropy_margin_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                        lower: float = 0.1, upper: float = 0.8) -> torch.Tensor:
    """AdaDFQ's hinge keeping the normalized disagreement entropy in ``[lower, upper]``
    (module docstring). Works for any batch size >= 1."""
    num_classes = teacher_logits.shape[-1]
    entropy = softmax_entropy(teacher_logits - student_logits)
    entropy_min = entropy.min()
    normalized = (entropy - entropy_min) / (math.log(num_classes) - entropy_min).clamp_min(1e-12)
    return (lower - normalized).clamp(min=0).mean() + (normalized - upper).clamp(min=0).mean()


def generator_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor,
                   bn_records: List[Tuple[torch.Tensor, ...]], alpha_ds: float = 0.2, alpha_as: float = 0.1,
                   beta: float = 1.0, gamma: float = 1.0, lower: float = 0.1, upper: float = 0.8,
                   bns_standardized: bool = False) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``(L_G, parts)``: AdaDFQ's generator objective (module docstring); ``parts`` holds the
    detached terms ``bns``, ``ce_ds`` (CE(y, t - s)), ``ce_as`` (CE(y, t + s)), ``margin``."""
    bns = _bns_term(bn_records, gamma, teacher_logits, bns_standardized)
    ce_ds = F.cross_entropy(teacher_logits - student_logits, labels)
    ce_as = F.cross_entropy(teacher_logits + student_logits, labels)
    margin = entropy_margin_loss(teacher_logits, student_logits, lower, upper)
    total = margin + beta * (alpha_ds * ce_ds + alpha_as * ce_as) + gamma * bns
    parts = {"bns": bns, "ce_ds": ce_ds, "ce_as": ce_as, "margin": margin}
    return total, {name: value.detach() for name, value in parts.items()}


def gdfq_generator_loss(teacher_logits: torch.Tensor, labels: torch.Tensor, bn_records: List[Tuple[torch.Tensor, ...]],
                        gamma: float = 0.1, bns_standardized: bool = False
                        ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``(L_G, parts)``: GDFQ's generator objective ``CE(y, t) + gamma * L_BNS`` (module docstring;
    no student term); ``parts`` holds the detached ``bns`` and ``ce`` (CE(y, t))."""
    bns = _bns_term(bn_records, gamma, teacher_logits, bns_standardized)
    ce = F.cross_entropy(teacher_logits, labels)
    return ce + gamma * bns, {"bns": bns.detach(), "ce": ce.detach()}


def entropy_distillation_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                              temperature: float = 20.0) -> torch.Tensor:
    """``-T^2 * mean_n H(softmax((t_n - s_n) / T))`` (GranQ / AdaDFQ student loss)."""
    return -(temperature ** 2) * softmax_entropy(teacher_logits - student_logits, temperature).mean()


def kl_distillation_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                         temperature: float = 20.0) -> torch.Tensor:
    """``T^2 * mean_n KL(softmax(t_n / T) || softmax(s_n / T))`` (Hinton et al. distillation)."""
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    return (temperature ** 2) * F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def student_loss(kind: str, teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """``kind`` = ``"entropy"`` (:func:`entropy_distillation_loss`) or ``"kl"`` (:func:`kl_distillation_loss`)."""
    if kind == "entropy":
        return entropy_distillation_loss(teacher_logits, student_logits, temperature)
    if kind == "kl":
        return kl_distillation_loss(teacher_logits, student_logits, temperature)
    raise ValueError(f"unknown student loss {kind!r}; expected one of {', '.join(STUDENT_LOSSES)}")
