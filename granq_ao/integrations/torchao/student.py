"""The zero-shot student built with torchao PT2E: :data:`STUDENT` (a :class:`~granq_ao.student_protocol.StudentProtocol`).

The student is :func:`~.prepare.prepare_student`'s graph: exported with a dynamic batch, prepared
with :class:`~.quantizer.GranQQuantizer` (conv-bn QAT patterns), then moved to its eval form
(``move_exported_model_to_eval``: batch norms use their running statistics and never update them,
their affine parameters train): the frozen-BN form. It stays in that form for good.

Train/eval: torchao refuses ``.train()``/``.eval()`` on an exported graph (its form is switched
with ``move_exported_model_to_train/eval`` instead, which would unfreeze the BN statistics).
:meth:`PT2EStudent.set_training` therefore only sets the graph's ``training`` flag: GranQ
fake-quants compute the same in both modes, and the frozen BN must stay frozen.

Quantizers: the :class:`~.fake_quantize.GranQPT2EFakeQuantize` modules the graph calls; a call is
a weight's when its input depends on no graph input (:func:`~.count.granq_fake_quant_calls`).
:meth:`PT2EStudent.count` counts calls (a shared instance counts at each call).
"""
from __future__ import annotations

from typing import Any, Dict

from torch import nn
from torch.fx import GraphModule
from torchao.quantization.pt2e import move_exported_model_to_eval

from granq_ao.config import GranQScheme
from granq_ao.student_protocol import StudentProtocol

from .count import granq_fake_quant_calls
from .prepare import prepare_student

__all__ = ["STUDENT", "PT2EStudent"]


def _quantizers_called(student: GraphModule, kind: str) -> Dict[str, nn.Module]:
    """``{module name: module}`` of the fake-quants whose calls are of ``kind`` (``"activation"`` /
    ``"weight"``), in graph order, each once."""
    targets = {node.name: str(node.target) for node in student.graph.nodes if node.op == "call_module"}
    names = dict.fromkeys(targets[call] for call in granq_fake_quant_calls(student)[kind])
    return {name: student.get_submodule(name) for name in names}


class PT2EStudent(StudentProtocol):
    """The torchao PT2E student (module docstring)."""

    toolchain = "pt2e"

    def prepare(self, teacher: nn.Module, scheme: GranQScheme, example_inputs: Any, fold_bn: bool = False
                ) -> nn.Module:
        if fold_bn:
            raise ValueError("fold_bn is not implemented for the pt2e student")
        return self.set_training(prepare_student(teacher, scheme, example_inputs, freeze_bn=True), False)

    def freeze_batchnorm(self, student: nn.Module) -> nn.Module:
        return move_exported_model_to_eval(student)

    def activation_quantizers(self, student: nn.Module) -> Dict[str, nn.Module]:
        return _quantizers_called(student, "activation")

    def weight_quantizers(self, student: nn.Module) -> Dict[str, nn.Module]:
        return _quantizers_called(student, "weight")

    def count(self, student: nn.Module) -> Dict[str, int]:
        return {kind: len(calls) for kind, calls in granq_fake_quant_calls(student).items()}

    def set_training(self, student: nn.Module, mode: bool) -> nn.Module:
        student.training = bool(mode)
        return student


STUDENT = PT2EStudent()
