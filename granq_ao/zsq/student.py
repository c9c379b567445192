"""The quantized student, built by one of the integrations (:data:`TOOLCHAINS`).

``build_student(toolchain, teacher, scheme, example_inputs)`` calls that integration's
``prepare_student`` (torch.ao FX here; ``granq_ao.integrations.modelopt.prepare_student`` for
``"modelopt"``); each returns a trainable GranQ copy with frozen BN statistics.

``prepare_student(teacher, scheme)`` (torch.ao) deep-copies the teacher and runs
``prepare_qat_fx(copy, get_granq_qat_qconfig_mapping(scheme), example_inputs)`` (the torch.ao
integration). torch.ao
fuses every conv + BN (+ ReLU) into ``torch.ao.nn.intrinsic.qat.ConvBn(ReLU)2d``, whose forward
folds the BN scale into the weight before the weight fake-quant::

    w_fold = w * gamma / sqrt(running_var + eps)
    y = BN(conv(x, fake_quant(w_fold)) / (gamma / sqrt(running_var + eps)))

Its BN statistics are frozen here (``freeze_bn_stats``: the BN runs in eval mode with the
teacher's running mean/variance, whatever ``.train()`` later says), as in the paper; gamma and
beta stay trainable. With fake-quant disabled the student computes the teacher's function, so
its accuracy before QAT is the quantized teacher's (no BN drift).
"""
from __future__ import annotations

import copy
import types
from typing import Dict

import torch
from torch import nn
from torch.ao.nn.intrinsic.qat import freeze_bn_stats

from granq_ao.config import GranQScheme, check_choice
from granq_ao.integrations.torch_ao import GranQFakeQuantize, get_granq_qat_qconfig_mapping, prepare_qat_fx
from granq_ao.integrations.torch_ao.frozen_bn import fold_frozen_batchnorm

__all__ = ["TOOLCHAINS", "check_student_options", "build_student", "prepare_student", "freeze_student_batchnorm", "count_fake_quants"]

# The integrations that can build a student (each needs its own toolchain installed; imported
# only when asked for).
TOOLCHAINS = ("fx", "pt2e", "modelopt")


def freeze_student_batchnorm(student: nn.Module) -> nn.Module:
    """Freeze BN running statistics of a prepared student: fused ConvBn QAT modules via
    ``freeze_bn_stats``; any stand-alone BatchNorm is put in eval mode. Returns ``student``."""
    student.apply(freeze_bn_stats)
    for module in student.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return student


def prepare_student(teacher: nn.Module, scheme: GranQScheme, example_inputs, fold_bn: bool = False
                    ) -> torch.fx.GraphModule:
    """A trainable fake-quantized copy of ``teacher`` (module docstring) for ``scheme``, traced
    with ``example_inputs`` (a tuple, e.g. ``(torch.zeros(1, 3, 32, 32),)``); the teacher is
    untouched. The returned GraphModule is in eval mode with BN statistics frozen; all its
    parameters require gradients. ``fold_bn=True``: the fused Conv-BN modules compute
    ``conv(x, fq(w * sf), beta + (b - mean) * sf)`` instead of torch.ao's divide-then-BN (same
    parameters and function, float rounding aside; see
    :mod:`granq_ao.integrations.torch_ao.frozen_bn`)."""
    student = copy.deepcopy(teacher).train()
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    student = prepare_qat_fx(student, get_granq_qat_qconfig_mapping(scheme), example_inputs)
    freeze_student_batchnorm(student)
    if fold_bn:
        fold_frozen_batchnorm(student)
    student.eval()
    return student


def _set_training_flag(module: nn.Module, mode: bool = True) -> nn.Module:
    module.training = bool(mode)
    return module


def _keep_graph_form(student: nn.Module) -> nn.Module:
    """An exported (PT2E) student refuses ``.train()``/``.eval()``; the trainer and evaluation
    call them. Here they only set the ``training`` flag: the graph stays in the eval form it was
    prepared in (BN statistics frozen, as every student's; GranQ fake-quants are the same in both
    forms). torchao's ``allow_exported_model_train_eval`` would instead move the graph to its
    training form on ``.train()``, unfreezing the BN statistics."""
    student.train = types.MethodType(_set_training_flag, student)
    student.eval = types.MethodType(lambda module: _set_training_flag(module, False), student)
    return student.eval()


def check_student_options(toolchain: str, fold_bn: bool = False) -> None:
    """``ValueError`` unless ``toolchain`` is one of :data:`TOOLCHAINS` and ``fold_bn`` (a bool)
    is asked of the fx student only."""
    check_choice(toolchain, TOOLCHAINS, "toolchain")
    if not isinstance(fold_bn, bool):
        raise ValueError(f"fold_bn must be True or False, got {fold_bn!r}")
    if fold_bn and toolchain != "fx":
        raise ValueError(f"fold_bn is implemented for the fx student only, not {toolchain!r}")


def build_student(toolchain: str, teacher: nn.Module, scheme: GranQScheme, example_inputs,
                  fold_bn: bool = False) -> nn.Module:
    """The student of ``teacher`` for ``scheme``, built by the integration ``toolchain`` (one of
    :data:`TOOLCHAINS`), with every parameter trainable (each integration's ``prepare_student``
    makes them so; the teacher's stay frozen); the teacher is untouched. ``fold_bn`` (fx only):
    see :func:`prepare_student`."""
    check_student_options(toolchain, fold_bn)
    if toolchain == "modelopt":
        from granq_ao.integrations import modelopt

        student = modelopt.prepare_student(teacher, scheme, example_inputs)
    elif toolchain == "pt2e":
        from granq_ao.integrations import torchao

        student = _keep_graph_form(torchao.prepare_student(teacher, scheme, example_inputs))
    else:
        student = prepare_student(teacher, scheme, example_inputs, fold_bn=fold_bn)
    return student


def count_fake_quants(student: nn.Module, toolchain: str = "fx") -> Dict[str, int]:
    """``{"weight": n, "activation": m}``: the GranQ fake-quants a student built by ``toolchain``
    runs: torch.ao, its ``GranQFakeQuantize`` modules (weight ones are ``weight_fake_quant``
    inside QAT conv/linear modules); torchao, the fake-quant calls of the PT2E graph; modelopt, its enabled quantizers on the GranQ backend
    (``*.weight_quantizer`` / ``*.input_quantizer``)."""
    check_choice(toolchain, TOOLCHAINS, "toolchain")
    counts = {"weight": 0, "activation": 0}
    if toolchain == "pt2e":
        from granq_ao.integrations import torchao

        return {kind: len(calls) for kind, calls in torchao.granq_fake_quant_calls(student).items()}
    if toolchain == "modelopt":
        from granq_ao.integrations import modelopt

        for name, module in student.named_modules():
            if modelopt.is_granq_quantizer(module) and module.is_enabled:
                counts["weight" if name.endswith("weight_quantizer") else "activation"] += 1
        return counts
    for name, module in student.named_modules():
        if isinstance(module, GranQFakeQuantize):
            counts["weight" if name.endswith("weight_fake_quant") else "activation"] += 1
    return counts
