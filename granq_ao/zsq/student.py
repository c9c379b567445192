"""The quantized student: a torch.ao FX QAT copy of the teacher with GranQ fake-quants.

``prepare_student(teacher, ...)`` deep-copies the teacher and runs
``granq_ao.prepare_qat_fx(copy, get_granq_qat_qconfig_mapping(...), example_inputs)``. torch.ao
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
from typing import Dict

import torch
from torch import nn
from torch.ao.nn.intrinsic.qat import freeze_bn_stats

__all__ = ["prepare_student", "freeze_student_batchnorm", "count_fake_quants"]


def freeze_student_batchnorm(student: nn.Module) -> nn.Module:
    """Freeze BN running statistics of a prepared student: fused ConvBn QAT modules via
    ``freeze_bn_stats``; any stand-alone BatchNorm is put in eval mode. Returns ``student``."""
    student.apply(freeze_bn_stats)
    for module in student.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return student


def prepare_student(teacher: nn.Module, weight_bits: int = 4, act_bits: int = 4,
                    act_granularity: str = "granq", weight_granularity: str = "channel",
                    act_placement: str = "paper", image_size: int = 32, fused=None) -> torch.fx.GraphModule:
    """A trainable fake-quantized copy of ``teacher`` (module docstring); the teacher is untouched.

    The returned GraphModule is in eval mode with BN statistics frozen; all its parameters
    require gradients.
    """
    from granq_ao import get_granq_qat_qconfig_mapping, prepare_qat_fx

    student = copy.deepcopy(teacher).train()
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    mapping = get_granq_qat_qconfig_mapping(weight_bits, act_bits, act_granularity=act_granularity,
                                            weight_granularity=weight_granularity,
                                            act_placement=act_placement, fused=fused)
    example_inputs = (torch.zeros(1, 3, image_size, image_size),)
    student = prepare_qat_fx(student, mapping, example_inputs)
    freeze_student_batchnorm(student)
    student.eval()
    return student


def count_fake_quants(student: nn.Module) -> Dict[str, int]:
    """``{"weight": n, "activation": m}``: GranQ fake-quant modules in a prepared student
    (weight ones live inside QAT conv/linear modules as ``weight_fake_quant``)."""
    from granq_ao.fake_quantize import GranQFakeQuantize

    counts = {"weight": 0, "activation": 0}
    for name, module in student.named_modules():
        if isinstance(module, GranQFakeQuantize):
            counts["weight" if name.endswith("weight_fake_quant") else "activation"] += 1
    return counts
