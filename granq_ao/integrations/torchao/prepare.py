"""Export with a dynamic batch and prepare for GranQ QAT in one call.

:func:`export_for_qat` is ``torch.export.export(model.train(), example_inputs, dynamic_shapes=...)``
with dim 0 of every tensor input dynamic (GranQ's ranges are per sample, so a prepared or
converted model must run at any batch size), returned as a ``GraphModule``.
:func:`prepare_student` adds ``prepare_qat_pt2e`` with a :class:`~.quantizer.GranQQuantizer`:
the student of the zero-shot trainer.
"""
from __future__ import annotations

import copy
from typing import Any, Optional, Tuple

import torch
from torch.fx import GraphModule
from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

from granq_ao.config import GranQScheme

from .quantizer import GranQQuantizer
from .train_eval import move_exported_model_to_eval, move_exported_model_to_train

__all__ = ["export_for_qat", "prepare_student"]


def export_for_qat(model: torch.nn.Module, example_inputs: Tuple[Any, ...], dynamic_batch: bool = True
                   ) -> GraphModule:
    """``torch.export.export(model.train(), example_inputs).module()``, with dim 0 of every tensor
    input dynamic (``torch.export.Dim.AUTO``; the example batch must be >= 2, as torch.export
    specializes sizes 0 and 1) when ``dynamic_batch``. Training mode: batch norms
    are exported in their training form, which ``prepare_qat_pt2e`` folds (conv-bn QAT)."""
    if not isinstance(example_inputs, tuple):
        raise TypeError(f"example_inputs must be a tuple of model inputs, got {type(example_inputs).__name__}")
    dynamic_shapes = None
    if dynamic_batch:
        small = [value.shape[:1] for value in example_inputs if isinstance(value, torch.Tensor) and
                 (value.dim() == 0 or value.shape[0] < 2)]
        if small:
            raise ValueError(f"export_for_qat: example batch {list(small[0])} is too small for a dynamic batch "
                             "dim: torch.export specializes sizes 0 and 1; give a batch of at least 2")
        dynamic_shapes = tuple({0: torch.export.Dim.AUTO} if isinstance(value, torch.Tensor) else None
                               for value in example_inputs)
    return torch.export.export(model.train(), example_inputs, dynamic_shapes=dynamic_shapes).module()


def prepare_student(model: torch.nn.Module, scheme: Optional[GranQScheme], example_inputs: Tuple[Any, ...],
                    freeze_bn: bool = True) -> GraphModule:
    """A GranQ QAT student ready to train: :func:`export_for_qat` (dynamic batch) then
    ``prepare_qat_pt2e(exported, GranQQuantizer(scheme))`` (``scheme=None``: ``GranQScheme()``).

    ``freeze_bn=True`` (the paper's student): the graph is moved to eval form with
    :func:`.train_eval.move_exported_model_to_eval` (torchao's, keeping each dropout's
    probability, which torchao's own sets to 0.5): batch norms normalize with their
    running statistics and no longer update them, while their affine parameters (and all
    weights) still get gradients; GranQ fake-quants behave the same in both forms. The same call
    also puts dropout in eval form. ``freeze_bn=False``: training form (batch statistics, running
    statistics updated). ``model.train()``/``.eval()`` are refused on the result (torchao's rule);
    use ``granq_ao.integrations.torchao.move_exported_model_to_train/eval``. ``model`` itself is left as it was (a copy is
    exported: exporting for QAT puts a model in training mode); every parameter of the result
    requires gradients, even where ``model``'s were frozen (a frozen teacher).
    """
    scheme = GranQScheme() if scheme is None else scheme
    prepared = prepare_qat_pt2e(export_for_qat(copy.deepcopy(model), example_inputs), GranQQuantizer(scheme))
    for parameter in prepared.parameters():
        parameter.requires_grad_(True)
    return move_exported_model_to_eval(prepared) if freeze_bn else move_exported_model_to_train(prepared)
