"""Export with a dynamic batch and prepare for GranQ QAT in one call.

:func:`export_for_qat` is ``torch.export.export(model.train(), example_inputs, dynamic_shapes=...)``
with dim 0 of every tensor input dynamic (GranQ's ranges are per sample, so a prepared or
converted model must run at any batch size), returned as a ``GraphModule``.
:func:`prepare_qat` is ``prepare_qat_pt2e`` that also takes networks whose BatchNorm weights
hold exact zeros (:mod:`.zero_gamma`). :func:`prepare_student` adds :func:`prepare_qat` with a
:class:`~.quantizer.GranQQuantizer`: the student of the zero-shot trainer.
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
from .zero_gamma import route_zero_gamma_conv_bn

__all__ = ["export_for_qat", "prepare_qat", "prepare_student", "check_deterministic_eval_form", "RANDOM_OPS"]

#: ATen ops that draw random numbers; none may remain in an eval-form graph
RANDOM_OPS = ("bernoulli", "bernoulli_", "rand", "rand_like", "randn", "randn_like", "randint", "randint_like",
              "randperm", "native_dropout", "multinomial", "normal", "normal_", "uniform_", "exponential_")


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


def prepare_qat(exported: GraphModule, quantizer: GranQQuantizer) -> GraphModule:
    """``prepare_qat_pt2e(exported, quantizer)``, then every conv-bn QAT pattern whose BatchNorm
    weight holds an exact 0 divides by a nonzero scale there (:mod:`.zero_gamma`: finite outputs,
    the same numbers elsewhere). ``quantizer`` must be a :class:`GranQQuantizer`."""
    if not isinstance(quantizer, GranQQuantizer):
        raise TypeError(f"quantizer must be a GranQQuantizer, got {type(quantizer).__name__}")
    quantizer._routes_zero_gamma = True
    try:
        prepared = prepare_qat_pt2e(exported, quantizer)
    finally:
        quantizer._routes_zero_gamma = False
    route_zero_gamma_conv_bn(prepared)
    return prepared


def check_deterministic_eval_form(model: GraphModule) -> None:
    """``ValueError`` if an exported graph in eval form still draws random numbers (an op of
    :data:`RANDOM_OPS`, or ``aten.dropout`` in training form). ``torch.export`` freezes
    ``self.training`` at export time: ``move_exported_model_to_eval`` turns dropout and batch norm
    back into their eval form, but not, e.g., torchvision's ``StochasticDepth`` or timm's
    ``DropPath``, whose random draws would make every evaluation differ."""
    for node in model.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(getattr(node.target, "overloadpacket", None), "__name__", "")
        training_dropout = name == "dropout" and len(node.args) > 2 and node.args[2] is True
        if name in RANDOM_OPS or training_dropout:
            stack = node.meta.get("nn_module_stack") or {}
            where = next(reversed(stack.values()))[0] if stack else "?"
            raise ValueError(
                f"the exported student still draws random numbers in eval form (aten.{name} at node '{node.name}', "
                f"in module '{where}'): torch.export froze self.training=True there (e.g. torchvision's "
                "StochasticDepth, timm's DropPath), so its evaluations would differ from call to call. Set that "
                "probability to 0 in the teacher (stochastic_depth_prob / drop_path_rate) or build the student "
                "with the fx toolchain, which keeps the flag live")


def prepare_student(model: torch.nn.Module, scheme: Optional[GranQScheme], example_inputs: Tuple[Any, ...],
                    freeze_bn: bool = True) -> GraphModule:
    """A GranQ QAT student ready to train: :func:`export_for_qat` (dynamic batch) then
    :func:`prepare_qat` ``(exported, GranQQuantizer(scheme))`` (``scheme=None``: ``GranQScheme()``).

    ``freeze_bn=True`` (the paper's student): the graph is moved to eval form with
    :func:`.train_eval.move_exported_model_to_eval` (torchao's, keeping each dropout's
    probability, which torchao's own sets to 0.5): batch norms normalize with their
    running statistics and no longer update them, while their affine parameters (and all
    weights) still get gradients; GranQ fake-quants behave the same in both forms. The same call
    also puts dropout in eval form; a graph that still draws random numbers then is refused
    (:func:`check_deterministic_eval_form`). ``freeze_bn=False``: training form (batch statistics, running
    statistics updated). ``model.train()``/``.eval()`` are refused on the result (torchao's rule);
    use ``granq_ao.integrations.torchao.move_exported_model_to_train/eval``. ``model`` itself is left as it was (a copy is
    exported: exporting for QAT puts a model in training mode); every parameter of the result
    requires gradients, even where ``model``'s were frozen (a frozen teacher).
    """
    scheme = GranQScheme() if scheme is None else scheme
    prepared = prepare_qat(export_for_qat(copy.deepcopy(model), example_inputs), GranQQuantizer(scheme))
    for parameter in prepared.parameters():
        parameter.requires_grad_(True)
    if not freeze_bn:
        return move_exported_model_to_train(prepared)
    prepared = move_exported_model_to_eval(prepared)
    check_deterministic_eval_form(prepared)
    return prepared
