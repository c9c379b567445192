"""``prepare_student``: the zero-shot trainer's quantized student, built with modelopt.

``prepare_student(teacher, scheme, example_inputs)`` deep-copies the teacher, runs
``mtq.quantize(copy, granq_quant_cfg(scheme, ...), forward_loop=None)`` and returns it in eval
mode with every parameter trainable and every BatchNorm frozen: running statistics are never
updated and normalization always uses them, even after ``student.train()`` (a forward pre-hook
puts each BatchNorm back in eval mode), as in the paper. BatchNorm is not folded into the conv
weights (modelopt keeps conv and BN separate): the weight fake-quant sees the conv weight
itself, unlike torch.ao FX QAT, which quantizes ``w * gamma / sqrt(var + eps)``.

:data:`STUDENT` is that student's :class:`~granq_ao.student_protocol.StudentProtocol`. Its
quantizers are the enabled ``TensorQuantizer`` modules on the GranQ backend: ``*.weight_quantizer``
and ``*.input_quantizer`` (modelopt quantizes the *input* of a layer, so one activation that feeds
two layers, e.g. a ResNet block's conv and its shortcut conv, passes through two quantizers).
:meth:`ModelOptStudent.quantizers_off` uses modelopt's own switches (``disable`` / ``enable``).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Dict, Iterator

import modelopt.torch.quantization as mtq
import torch
from modelopt.torch.quantization.nn import TensorQuantizer
from torch import nn

from granq_ao.config import GranQScheme
from granq_ao.student_protocol import StudentProtocol

from ._backend import is_granq_quantizer
from ._config import granq_quant_cfg

__all__ = ["prepare_student", "freeze_batchnorm", "ModelOptStudent", "STUDENT"]


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


def _granq_quantizers(student: nn.Module, weights: bool) -> Dict[str, nn.Module]:
    """The enabled GranQ quantizers of ``student``: ``*.weight_quantizer`` ones when ``weights``,
    else the others (``*.input_quantizer``)."""
    return {name: module for name, module in student.named_modules()
            if is_granq_quantizer(module) and module.is_enabled and name.endswith("weight_quantizer") == weights}


class ModelOptStudent(StudentProtocol):
    """The modelopt student (module docstring): ``.train()``/``.eval()`` work as usual, BatchNorm
    stays frozen through its forward pre-hook."""

    toolchain = "modelopt"

    def prepare(self, teacher: nn.Module, scheme: GranQScheme, example_inputs: Any, fold_bn: bool = False
                ) -> nn.Module:
        if fold_bn:
            raise ValueError("fold_bn is not implemented for the modelopt student")
        return prepare_student(teacher, scheme, example_inputs)

    def freeze_batchnorm(self, student: nn.Module) -> nn.Module:
        return freeze_batchnorm(student)

    def activation_quantizers(self, student: nn.Module) -> Dict[str, nn.Module]:
        return _granq_quantizers(student, weights=False)

    def weight_quantizers(self, student: nn.Module) -> Dict[str, nn.Module]:
        return _granq_quantizers(student, weights=True)

    @contextlib.contextmanager
    def quantizers_off(self, student: nn.Module) -> Iterator[nn.Module]:
        enabled = [m for m in student.modules() if isinstance(m, TensorQuantizer) and m.is_enabled]
        try:
            for module in enabled:
                module.disable()
            yield student
        finally:
            for module in enabled:
                module.enable()


STUDENT = ModelOptStudent()
