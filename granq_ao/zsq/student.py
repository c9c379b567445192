"""The quantized student: a lookup from a toolchain's name to its integration's student protocol.

Each integration offers one :class:`~granq_ao.student_protocol.StudentProtocol` object,
``STUDENT`` (prepare, quantizers, count, train/eval, the frozen-BN form);
:func:`student_protocol` returns it for a name of :data:`TOOLCHAINS`, importing the integration
only then (each needs its own toolchain installed). Everything here is that lookup followed by
one protocol call: nothing depends on which toolchain it is.

``prepare_student`` and ``freeze_student_batchnorm`` are the torch.ao FX ones
(:mod:`granq_ao.integrations.torch_ao.student`), kept here under their old names.
"""
from __future__ import annotations

import importlib
from typing import Dict

from torch import nn

from granq_ao.config import GranQScheme, check_choice
from granq_ao.integrations.torch_ao import freeze_student_batchnorm, prepare_student
from granq_ao.student_protocol import StudentProtocol

__all__ = ["TOOLCHAINS", "student_protocol", "check_student_options", "build_student", "prepare_student",
           "freeze_student_batchnorm", "count_fake_quants"]

# toolchain name -> the integration package whose ``STUDENT`` builds that student
INTEGRATIONS = {"fx": "granq_ao.integrations.torch_ao", "pt2e": "granq_ao.integrations.torchao",
                "modelopt": "granq_ao.integrations.modelopt"}
TOOLCHAINS = tuple(INTEGRATIONS)


def student_protocol(toolchain: str) -> StudentProtocol:
    """The student protocol of ``toolchain`` (one of :data:`TOOLCHAINS`; ``ValueError`` otherwise).
    Importing an integration whose toolchain is missing raises its ``ImportError`` (with the
    ``pip install`` line)."""
    check_choice(toolchain, TOOLCHAINS, "toolchain")
    return importlib.import_module(INTEGRATIONS[toolchain]).STUDENT


def check_student_options(toolchain: str, fold_bn: bool = False) -> None:
    """``ValueError`` unless ``toolchain`` is one of :data:`TOOLCHAINS` and ``fold_bn`` (a bool)
    is asked only of a student whose protocol folds BN (imported only then)."""
    check_choice(toolchain, TOOLCHAINS, "toolchain")
    if not isinstance(fold_bn, bool):
        raise ValueError(f"fold_bn must be True or False, got {fold_bn!r}")
    if fold_bn and not student_protocol(toolchain).folds_bn:
        raise ValueError(f"fold_bn is not implemented for the {toolchain} student")


def build_student(toolchain: str, teacher: nn.Module, scheme: GranQScheme, example_inputs,
                  fold_bn: bool = False) -> nn.Module:
    """The student of ``teacher`` for ``scheme``, built by the integration ``toolchain`` (one of
    :data:`TOOLCHAINS`): every parameter trainable, BN frozen, eval mode; the teacher is
    untouched. ``fold_bn``: see :func:`prepare_student`."""
    check_student_options(toolchain, fold_bn)
    return student_protocol(toolchain).prepare(teacher, scheme, example_inputs, fold_bn=fold_bn)


def count_fake_quants(student: nn.Module, toolchain: str = "fx") -> Dict[str, int]:
    """``{"weight": n, "activation": m}``: the GranQ quantizers a student built by ``toolchain``
    runs (torch.ao: its ``GranQFakeQuantize`` modules; PT2E: the fake-quant calls of the graph;
    modelopt: its enabled quantizers on the GranQ backend)."""
    return student_protocol(toolchain).count(student)
