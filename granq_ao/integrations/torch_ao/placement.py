"""Where activation fake-quants sit: torch.ao's placement, or the paper's (after ReLU/ReLU6).

torch.ao FX observes the input and output of every quantizable op (the input image, conv-bn
outputs without ReLU, residual sums, pooled features, logits). The GranQ paper and its official
code quantize activations only at the outputs of ReLU/ReLU6 (19 points in ResNet-20), so torch.ao's
fixed 8-bit fake-quants after sigmoid/hardsigmoid/tanh go too. torch.ao
cannot express that in a QConfigMapping alone (a fused conv-bn-relu must share one qconfig
across its parts), so ``apply_paper_placement`` edits the prepared graph: every call of a
GranQ activation fake-quant whose input is not produced by a ReLU/ReLU6 (module, function,
method, or a fused ``...ReLU`` module) is removed. A fake-quant instance shared between a ReLU
output and the ops that reuse its observer (avgpool, flatten, view) thus stays only after the
ReLU. Weight fake-quants (inside QAT modules) are untouched.
"""
from __future__ import annotations

import torch
from torch.ao.quantization.fake_quantize import FixedQParamsFakeQuantize
from torch.fx import GraphModule, Node

from granq_ao.relu import RELU_METHOD_NAMES, is_relu_call, is_relu_module

from .fake_quantize import GranQFakeQuantize

# GranQ's activation fake-quants, and torch.ao's fixed 8-bit ones the mapping keeps after
# sigmoid/hardsigmoid/tanh/softmax: the paper quantizes ReLU/ReLU6 outputs and nothing else
# (and the PT2E quantizer's paper placement puts nothing there either).
_PAPER_REMOVES = (GranQFakeQuantize, FixedQParamsFakeQuantize)


def _is_relu_output(node: Node, modules: dict) -> bool:
    """Whether the value of ``node`` is a ReLU/ReLU6 output (``granq_ao.relu`` decides)."""
    if node.op == "call_module":
        return is_relu_module(modules[str(node.target)])
    if node.op == "call_function":
        return is_relu_call(node.target, node.args, node.kwargs)
    if node.op == "call_method":
        return node.target in RELU_METHOD_NAMES
    return False


def _modules_by_name(model: GraphModule) -> dict:
    # remove_duplicate=False: FX registers a shared fake-quant (maxpool, avgpool, flatten, view
    # reuse their input's) under several names, and the graph calls it by each of them.
    return dict(model.named_modules(remove_duplicate=False))


def apply_paper_placement(model: GraphModule) -> int:
    """Remove GranQ activation fake-quant calls not fed by a ReLU/ReLU6; return how many.

    Fake-quant modules no longer called anywhere are deleted from ``model``.
    """
    modules = _modules_by_name(model)
    removed_targets = set()
    removed = 0
    for node in list(model.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), _PAPER_REMOVES):
            continue
        source = node.args[0]
        if isinstance(source, Node) and _is_relu_output(source, modules):
            continue
        node.replace_all_uses_with(source)
        model.graph.erase_node(node)
        removed_targets.add(str(node.target))
        removed += 1
    drop_uncalled(model, removed_targets)
    return removed


def drop_uncalled(model: GraphModule, removed_targets) -> None:
    """Delete the submodules named in ``removed_targets`` that no graph call uses any more (by name:
    an alias of a shared instance goes, the instance stays where still called), then every unused
    submodule, and recompile ``model``."""
    still_called = {str(node.target) for node in model.graph.nodes if node.op == "call_module"}
    for target in sorted(set(removed_targets) - still_called):
        model.delete_submodule(target)
    model.delete_all_unused_submodules()
    model.recompile()


def activation_fake_quant_calls(model: torch.nn.Module, cls: type = GranQFakeQuantize) -> list:
    """The activation fake-quant modules of class ``cls`` in a prepared model, one entry per
    call site.

    FX (a ``GraphModule``): one entry per call in the graph (a shared instance appears once per
    call, under each name FX calls it by). Eager mode (``torch.ao.quantization.prepare_qat``):
    one entry per module carrying it as ``activation_post_process`` (its forward hook calls it
    once per call of that module). Weight fake-quants are never counted."""
    if isinstance(model, GraphModule):
        modules = _modules_by_name(model)
        return [modules[str(node.target)] for node in model.graph.nodes
                if node.op == "call_module" and isinstance(modules.get(str(node.target)), cls)]
    return [module.activation_post_process for module in model.modules()
            if isinstance(getattr(module, "activation_post_process", None), cls)
            and not isinstance(module, cls)]


def count_activation_fake_quant_calls(model: torch.nn.Module) -> int:
    """Number of GranQ activation fake-quant call sites in a prepared model, FX or eager (see
    :func:`activation_fake_quant_calls`)."""
    return len(activation_fake_quant_calls(model))
