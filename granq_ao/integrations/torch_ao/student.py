"""The zero-shot student built with torch.ao FX QAT: :data:`STUDENT` (a :class:`~granq_ao.student_protocol.StudentProtocol`).

``prepare_student(teacher, scheme, example_inputs)`` deep-copies the teacher and runs
``prepare_qat_fx(copy, get_granq_qat_qconfig_mapping(scheme), example_inputs)``. torch.ao fuses
every conv + BN (+ ReLU) into ``torch.ao.nn.intrinsic.qat.ConvBn(ReLU)2d``, whose forward folds
the BN scale into the weight before the weight fake-quant::

    w_fold = w * gamma / sqrt(running_var + eps)
    y = BN(conv(x, fake_quant(w_fold)) / (gamma / sqrt(running_var + eps)))

Its BN statistics are frozen (``freeze_bn_stats``: the BN runs in eval mode with the teacher's
running mean/variance, whatever ``.train()`` later says), as in the paper; gamma and beta stay
trainable. With fake-quant disabled the student computes the teacher's function, so its accuracy
before QAT is the quantized teacher's (no BN drift). ``fold_bn=True``: the fused modules compute
``conv(x, fq(w * sf), beta + (b - mean) * sf)`` instead (:mod:`.frozen_bn`).
"""
from __future__ import annotations

import copy
from typing import Any, Dict

import torch
from torch import nn
from torch.ao.nn.intrinsic.qat import freeze_bn_stats

from granq_ao.config import GranQScheme
from granq_ao.student_protocol import StudentProtocol

from .fake_quantize import GranQFakeQuantize
from .frozen_bn import fold_frozen_batchnorm
from .prepare import prepare_qat_fx
from .qconfig import get_granq_qat_qconfig_mapping

__all__ = ["STUDENT", "FXStudent", "prepare_student", "freeze_student_batchnorm"]


def freeze_student_batchnorm(student: nn.Module) -> nn.Module:
    """Freeze BN running statistics of a prepared student: fused ConvBn QAT modules via
    ``freeze_bn_stats``; any stand-alone BatchNorm is put in eval mode, and so is any module that
    holds running statistics itself (a BN traced as ``F.batch_norm`` inside its owner, e.g. timm's
    ``BatchNormAct2d``: its live training flag is the owner's). Returns ``student``."""
    student.apply(freeze_bn_stats)
    for module in student.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) or "running_mean" in module._buffers:
            module.eval()
    return student


def prepare_student(teacher: nn.Module, scheme: GranQScheme, example_inputs: Any, fold_bn: bool = False
                    ) -> torch.fx.GraphModule:
    """A trainable fake-quantized copy of ``teacher`` (module docstring) for ``scheme``, traced
    with ``example_inputs`` (a tuple, e.g. ``(torch.zeros(1, 3, 32, 32),)``); the teacher is
    untouched. The returned GraphModule is in eval mode with BN statistics frozen; all its
    parameters require gradients. ``fold_bn=True``: the fused Conv-BN modules compute
    ``conv(x, fq(w * sf), beta + (b - mean) * sf)`` instead of torch.ao's divide-then-BN (same
    parameters and function, float rounding aside; see :mod:`.frozen_bn`)."""
    student = copy.deepcopy(teacher).train()
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    student = prepare_qat_fx(student, get_granq_qat_qconfig_mapping(scheme), example_inputs)
    freeze_student_batchnorm(student)
    if fold_bn:
        fold_frozen_batchnorm(student)
    student.eval()
    return student


def _granq_fake_quants(student: nn.Module, weights: bool) -> Dict[str, nn.Module]:
    """The :class:`GranQFakeQuantize` modules of ``student``: those of weights (``weight_fake_quant``
    inside QAT conv/linear modules) when ``weights``, else the others (activations)."""
    return {name: module for name, module in student.named_modules()
            if isinstance(module, GranQFakeQuantize) and name.endswith("weight_fake_quant") == weights}


class FXStudent(StudentProtocol):
    """The torch.ao FX student (module docstring): a ``GraphModule`` of fused QAT modules whose
    fake-quants are :class:`GranQFakeQuantize`; ``.train()``/``.eval()`` work as usual."""

    toolchain = "fx"
    folds_bn = True

    def prepare(self, teacher: nn.Module, scheme: GranQScheme, example_inputs: Any, fold_bn: bool = False
                ) -> nn.Module:
        return prepare_student(teacher, scheme, example_inputs, fold_bn=fold_bn)

    def freeze_batchnorm(self, student: nn.Module) -> nn.Module:
        return freeze_student_batchnorm(student)

    def activation_quantizers(self, student: nn.Module) -> Dict[str, nn.Module]:
        return _granq_fake_quants(student, weights=False)

    def weight_quantizers(self, student: nn.Module) -> Dict[str, nn.Module]:
        return _granq_fake_quants(student, weights=True)


STUDENT = FXStudent()
