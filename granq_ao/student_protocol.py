"""The student protocol: what zero-shot QAT needs from a toolchain's quantized copy of a teacher.

A *student* is a trainable fake-quantized copy of a float teacher whose BatchNorm statistics are
frozen (normalization always uses the teacher's running statistics; the affine parameters and
every weight train). Each integration offers one :class:`StudentProtocol` object, ``STUDENT``
(``granq_ao.integrations.torch_ao.STUDENT`` builds it with torch.ao FX, ``...torchao.STUDENT``
with PT2E, ``...modelopt.STUDENT`` with ``mtq.quantize``); :mod:`granq_ao.zsq.student` looks
them up by toolchain name. Everything the trainer, its counts and its pictures do to a student
goes through these methods, so no caller needs to know which toolchain built it:

* :meth:`~StudentProtocol.prepare`: teacher -> student (the frozen-BN form,
  :meth:`~StudentProtocol.freeze_batchnorm`, included);
* :meth:`~StudentProtocol.activation_quantizers` / :meth:`~StudentProtocol.weight_quantizers`:
  the GranQ quantizer modules, by qualified name. Each is called with the tensor it quantizes
  as its first argument, so a forward pre-hook sees that tensor;
* :meth:`~StudentProtocol.count`: how many quantizers of each kind the student runs;
* :meth:`~StudentProtocol.set_training`: train/eval as the toolchain allows it (an exported
  PT2E graph refuses ``.train()``/``.eval()``);
* :meth:`~StudentProtocol.quantizers_off`: the float network the student's weights define.
"""
from __future__ import annotations

import abc
import contextlib
from typing import Any, Dict, Iterator

from torch import nn

from .config import GranQScheme

__all__ = ["StudentProtocol"]


class StudentProtocol(abc.ABC):
    """One toolchain's way to build and handle a zero-shot student (module docstring).

    Attributes:
        toolchain: the name that selects it (``ZSQConfig.toolchain``, ``--toolchain``).
        folds_bn: whether :meth:`prepare` implements ``fold_bn=True`` (frozen BN folded into the
            convs' forward: same function, float rounding aside).
    """

    toolchain: str = ""
    folds_bn: bool = False

    @abc.abstractmethod
    def prepare(self, teacher: nn.Module, scheme: GranQScheme, example_inputs: Any,
                fold_bn: bool = False) -> nn.Module:
        """A trainable GranQ copy of ``teacher`` for ``scheme`` (``example_inputs``: a tuple of
        model inputs, batch >= 2), in its frozen-BN form, in eval mode, with every parameter
        requiring gradients; ``teacher`` is untouched."""

    @abc.abstractmethod
    def freeze_batchnorm(self, student: nn.Module) -> nn.Module:
        """Put ``student`` in its frozen-BN form (running statistics used and never updated,
        whatever :meth:`set_training` later says); returns it."""

    @abc.abstractmethod
    def activation_quantizers(self, student: nn.Module) -> Dict[str, nn.Module]:
        """``{qualified name: module}``: the GranQ quantizers of activations, in module order
        (a module shared by several ops appears once)."""

    @abc.abstractmethod
    def weight_quantizers(self, student: nn.Module) -> Dict[str, nn.Module]:
        """``{qualified name: module}``: the GranQ quantizers of weights, in module order."""

    def count(self, student: nn.Module) -> Dict[str, int]:
        """``{"weight": n, "activation": m}``: the GranQ quantizers ``student`` runs."""
        return {"weight": len(self.weight_quantizers(student)), "activation": len(self.activation_quantizers(student))}

    def set_training(self, student: nn.Module, mode: bool) -> nn.Module:
        """``student.train(mode)`` where the toolchain allows it (the frozen BN stays frozen)."""
        return student.train(mode)

    @contextlib.contextmanager
    def quantizers_off(self, student: nn.Module) -> Iterator[nn.Module]:
        """Inside the block every fake-quant and observer of ``student`` is off: it computes the
        float network its weights define. Each switch is restored after. This default handles
        fake-quants with torch.ao's ``FakeQuantizeBase`` switches (``fake_quant_enabled`` /
        ``observer_enabled`` buffers, ``enable_fake_quant`` / ``enable_observer``)."""
        switched = [m for m in student.modules() if hasattr(m, "fake_quant_enabled") and hasattr(m, "observer_enabled")]
        saved = [(m, bool(m.fake_quant_enabled[0]), bool(m.observer_enabled[0])) for m in switched]
        try:
            for module in switched:
                module.enable_fake_quant(False)
                module.enable_observer(False)
            yield student
        finally:
            for module, fake_quant_on, observer_on in saved:
                module.enable_fake_quant(fake_quant_on)
                module.enable_observer(observer_on)
