"""``prepare_student``: the zero-shot trainer's quantized student, built with modelopt.

``prepare_student(teacher, scheme, example_inputs)`` deep-copies the teacher, runs
``mtq.quantize(copy, granq_quant_cfg(scheme, ...), forward_loop=None)`` and returns it in eval
mode with every parameter trainable and every BatchNorm frozen: running statistics are never
updated and normalization always uses them, even after ``student.train()`` (a forward pre-hook
puts each BatchNorm back in eval mode), as in the paper. BatchNorm is not folded into the conv
weights (modelopt keeps conv and BN separate): the weight fake-quant sees the conv weight
itself, unlike torch.ao FX QAT, which quantizes ``w * gamma / sqrt(var + eps)``.
"""
from __future__ import annotations

import copy
from typing import Any

import modelopt.torch.quantization as mtq
import torch
from torch import nn

from granq_ao.config import GranQScheme

from ._config import granq_quant_cfg

__all__ = ["prepare_student", "freeze_batchnorm"]


def _stay_in_eval(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: a frozen BatchNorm normalizes with its running statistics, always."""
    module.training = False


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Put every BatchNorm of ``model`` in eval mode for good (running statistics frozen, affine
    parameters still trainable); returns ``model``."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
            module.register_forward_pre_hook(_stay_in_eval)
    return model


def prepare_student(model: nn.Module, scheme: GranQScheme, example_inputs: Any) -> nn.Module:
    """A trainable GranQ fake-quantized copy of ``model`` (module docstring); ``model`` is
    untouched. ``example_inputs`` (a tensor or a tuple of arguments) drives the data-flow pass
    of the paper placement."""
    if not isinstance(scheme, GranQScheme):
        raise TypeError(f"scheme must be a GranQScheme, got {type(scheme).__name__}")
    student = copy.deepcopy(model).eval()
    config = granq_quant_cfg(scheme, model=student, example_inputs=example_inputs)
    student = mtq.quantize(student, config, forward_loop=None)
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    freeze_batchnorm(student)
    return student.eval()
