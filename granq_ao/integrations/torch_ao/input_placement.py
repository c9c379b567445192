"""The ``"inputs"`` placement: one GranQ activation fake-quant on the input of every conv/linear.

What TensorRT and modelopt quantize, and what a deployment needs: on any network (ReLU or not),
each conv / transposed conv / linear layer reads a quantized input, and nothing else is
quantized (BN outputs, residual sums, SiLU/GELU outputs, the logits stay float).

* FX (:func:`apply_input_placement` on a ``prepare_qat_fx`` GraphModule; :func:`granq_ao.prepare_qat_fx`
  calls it for a mapping made with ``act_placement="inputs"``): torch.ao has put a fake-quant
  before every quantized op's input and after its output. A GranQ activation fake-quant call is
  kept where its value is the input (``args[0]``) of a conv/linear (module or functional call),
  and it then feeds only those layers: every other user reads the unquantized value again. Calls
  that feed no conv/linear are removed. A value read by several conv/linear layers is
  fake-quantized once (torch.ao inserts one fake-quant per value). torch.ao's activation
  fake-quants on parameters read by other ops (ConvNeXt's ``layer_scale`` in a ``mul``) go too;
  the weight fake-quants of functional ``F.conv2d``/``F.linear`` calls (``args[1]``) stay.
  torch.ao's own activation fake-quants that feed no conv/linear (the fixed-qparams 8-bit ones
  on sigmoid / hard-sigmoid outputs in squeeze-excitation blocks) go as well. Every kept call gets a
  fake-quant instance of its own (torch.ao shares one instance between, e.g., a ReLU output and
  the max-pool after it; here each conv input gets its own ranges, as in the PT2E quantizer).
* eager (:func:`apply_input_placement` on a ``torch.ao.quantization.prepare_qat`` model): every
  QAT conv/linear module gets a GranQ fake-quant (its ``qconfig.activation``) as
  ``activation_post_process`` run by torch.ao's forward *pre*-hook on its input; every other
  GranQ activation fake-quant (module outputs, ``QuantStub``, ``FloatFunctional``) is removed.
  Eager mode sees no data flow: a value read by two layers is fake-quantized by each (the same
  numbers, twice the work). :func:`granq_ao.convert_eager` converts the result.

Weight fake-quants are untouched.
"""
from __future__ import annotations

import copy
import importlib

import torch
import torch.nn.functional as nn_functional
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.ao.quantization.observer import ObserverBase
from torch.fx import GraphModule, Node

from granq_ao.fx_graph import reaches_placeholder

from .fake_quantize import GranQFakeQuantize
from .placement import drop_uncalled

__all__ = ["apply_input_placement", "is_weighted_call", "count_weighted_inputs", "WEIGHTED_FUNCTIONS"]

#: functional conv/linear calls whose ``args[0]`` is the quantized input
WEIGHTED_FUNCTIONS = frozenset({
    nn_functional.conv1d, nn_functional.conv2d, nn_functional.conv3d, nn_functional.conv_transpose1d,
    nn_functional.conv_transpose2d, nn_functional.conv_transpose3d, nn_functional.linear,
    torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
    torch.conv_transpose3d,
})
# nn.modules.conv._ConvNd holds Conv1/2/3d, ConvTranspose1/2/3d and torch.ao's QAT (fused) forms
_WEIGHTED_MODULES = (nn.modules.conv._ConvNd, nn.Linear)


def is_weighted_call(node: Node, modules: dict) -> bool:
    """Whether ``node`` calls a conv / transposed conv / linear (module or function)."""
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _WEIGHTED_MODULES)
    return node.op == "call_function" and node.target in WEIGHTED_FUNCTIONS


def count_weighted_inputs(model: torch.nn.Module) -> int:
    """How many distinct values are read as input by a conv/linear in an FX graph (what
    ``"inputs"`` would quantize), or, for an eager model, how many conv/linear modules it holds."""
    if isinstance(model, GraphModule):
        modules = dict(model.named_modules(remove_duplicate=False))
        values = set()
        for node in model.graph.nodes:
            if is_weighted_call(node, modules) and node.args:
                source = node.args[0]
                while isinstance(source, Node) and _is_activation_fake_quant(source, modules):
                    source = source.args[0]
                values.add(source)
        return len(values)
    return sum(isinstance(module, _WEIGHTED_MODULES) for module in model.modules())


def _is_granq_call(node: Node, modules: dict) -> bool:
    return node.op == "call_module" and isinstance(modules.get(str(node.target)), GranQFakeQuantize) and bool(node.args)


def _is_activation_fake_quant(node: Node, modules: dict) -> bool:
    """A call of a GranQ fake-quant on an activation (its input depends on a graph input; a
    weight fake-quant of a functional conv/linear reads a parameter)."""
    return (_is_granq_call(node, modules) and isinstance(node.args[0], Node)
            and reaches_placeholder(node.args[0]))


def _is_other_activation_quantizer(node: Node, modules: dict) -> bool:
    """A call of one of torch.ao's own activation fake-quants/observers (e.g. the fixed-qparams
    fake-quant of a sigmoid / hard-sigmoid output) that feeds no conv/linear."""
    module = modules.get(str(node.target)) if node.op == "call_module" else None
    if not isinstance(module, (FakeQuantizeBase, ObserverBase)) or isinstance(module, GranQFakeQuantize):
        return False
    return node.args and not any(is_weighted_call(user, modules) for user in node.users)


def _apply_fx(model: GraphModule) -> int:
    modules = dict(model.named_modules(remove_duplicate=False))
    kept = 0
    removed_targets = set()
    for node in list(model.graph.nodes):
        if _is_other_activation_quantizer(node, modules):
            node.replace_all_uses_with(node.args[0])
            model.graph.erase_node(node)
            removed_targets.add(str(node.target))
            continue
        if not _is_granq_call(node, modules):
            continue
        source = node.args[0]
        input_uses = 0
        for user in list(node.users):
            if not is_weighted_call(user, modules):
                user.replace_input_with(node, source)
            elif user.args and user.args[0] is node:
                # the input (args[0]) stays quantized; any other use of it reads the float value
                user.args = (node,) + tuple(source if arg is node else arg for arg in user.args[1:])
                user.kwargs = {key: source if value is node else value for key, value in user.kwargs.items()}
                input_uses += 1
            # else: the weight fake-quant of a functional conv/linear (args[1]): untouched
        if not node.users:
            model.graph.erase_node(node)
            removed_targets.add(str(node.target))
        elif input_uses and _is_activation_fake_quant(node, modules):
            # a fake-quant of its own (torch.ao may share one instance between several values)
            name = f"{str(node.target).replace('.', '_')}_input{kept}"
            while hasattr(model, name):
                name += "_"
            model.add_submodule(name, copy.deepcopy(modules[str(node.target)]))
            removed_targets.add(str(node.target))
            node.target = name
            kept += 1
    drop_uncalled(model, removed_targets)
    return kept


def _torch_observer_hooks():
    """torch.ao's eager ``(_observer_forward_hook, _observer_forward_pre_hook)``."""
    torch_quantize = importlib.import_module("torch.ao.quantization.quantize")
    return torch_quantize._observer_forward_hook, torch_quantize._observer_forward_pre_hook


def _drop_activation(module: nn.Module, hooks) -> None:
    """Remove ``module``'s GranQ ``activation_post_process`` and torch.ao's hooks that call it."""
    for table in (module._forward_hooks, module._forward_pre_hooks):
        for handle_id, hook in list(table.items()):
            if any(hook is torch_hook for torch_hook in hooks):
                del table[handle_id]
    if isinstance(module, FloatFunctional):
        module.activation_post_process = nn.Identity()  # it calls the quantizer itself
    else:
        del module.activation_post_process


def _apply_eager(model: nn.Module) -> int:
    output_hook, pre_hook = _torch_observer_hooks()
    for module in list(model.modules()):
        if isinstance(module._modules.get("activation_post_process"), GranQFakeQuantize):
            _drop_activation(module, (output_hook, pre_hook))
    kept = 0
    for module in model.modules():
        if "weight_fake_quant" in module._modules and isinstance(module, _WEIGHTED_MODULES):
            qconfig = getattr(module, "qconfig", None)
            quantizer = qconfig.activation() if qconfig is not None else None
            if not isinstance(quantizer, GranQFakeQuantize):
                continue
            quantizer.train(module.training)
            module.activation_post_process = quantizer
            module.register_forward_pre_hook(pre_hook, prepend=True)
            kept += 1
    return kept


def apply_input_placement(model: nn.Module) -> int:
    """Put GranQ activation fake-quants on the inputs of conv/linear layers only (module
    docstring), in place; returns how many activation fake-quant call sites remain. ``model``:
    an FX GraphModule from ``prepare_qat_fx`` or an eager model from ``prepare_qat``."""
    if isinstance(model, GraphModule):
        return _apply_fx(model)
    return _apply_eager(model)
