"""PT2E conv-bn QAT patterns whose BatchNorm weight (gamma) is exactly 0 somewhere: finite outputs.

``prepare_qat_pt2e`` rewrites every annotated conv -> batch norm into torchao's simulated fold,
with ``sf = gamma / sqrt(running_var + eps)``::

    y = batch_norm(conv(x, fq(w * sf)) / sf + b)

A channel with ``gamma == 0`` (timm's ``zero_init_last``, torchvision's ``zero_init_residual``, a
pruned channel) divides ``0 / 0 = NaN``. Its true output is ``beta``, whatever the conv computes.
:func:`route_zero_gamma_conv_bn` edits a prepared graph: ``sf`` of each pattern whose ``gamma``
holds an exact 0 becomes ``where(sf == 0, 1 / sqrt(running_var + eps), sf)`` for the weight
scaling and the division alike (the torch.ao integration's zero-gamma-safe forward, the same
operations): zero-gamma channels give ``beta`` and keep BN's gradient for gamma; the other
channels compute exactly what torchao's pattern computes. Patterns without a zero gamma are left
untouched (torchao's convert still recognises them to fold).

:meth:`GranQQuantizer.validate` refuses a bare ``prepare_qat_pt2e`` of such a network with an
error naming the BatchNorm and the cause; :func:`~.prepare.prepare_qat` (and
:func:`~.prepare.prepare_student`) prepare it and route around it.
"""
from __future__ import annotations

from typing import List

import torch
from torch.fx import GraphModule, Node

__all__ = ["route_zero_gamma_conv_bn", "zero_gamma_batch_norms", "BATCH_NORM_OPS"]

_aten = torch.ops.aten
BATCH_NORM_OPS = frozenset({
    _aten.batch_norm.default, _aten._native_batch_norm_legit_no_training.default,
    _aten._native_batch_norm_legit.default, _aten.cudnn_batch_norm.default, _aten.native_batch_norm.default,
})


def _attribute(model: GraphModule, node: Node):
    if not isinstance(node, Node) or node.op != "get_attr":
        return None
    value = model
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    return value


def _has_zero(value) -> bool:
    return isinstance(value, torch.Tensor) and bool((value.detach() == 0).any())


def _training_form(node: Node) -> bool:
    """A batch norm exported in training form (what ``prepare_qat_pt2e`` rewrites into its conv-bn
    QAT pattern; an eval-form export, as for ``prepare_pt2e``, is left as it is)."""
    if node.target == _aten.batch_norm.default:
        return len(node.args) > 5 and node.args[5] is True
    return node.target != _aten._native_batch_norm_legit_no_training.default


def zero_gamma_batch_norms(model: GraphModule, after=None) -> List[str]:
    """The BatchNorm weights of an exported graph that hold an exact 0, by name
    (``"layer1.0.bn2.weight"``), in graph order; ``after(node)``: only batch norms in training
    form whose input node it accepts."""
    names = []
    for node in model.graph.nodes:
        if node.op == "call_function" and node.target in BATCH_NORM_OPS and len(node.args) > 1:
            if after is not None and not (isinstance(node.args[0], Node) and after(node.args[0])
                                          and _training_form(node)):
                continue
            gamma = node.args[1]
            if _has_zero(_attribute(model, gamma)) and str(gamma.target) not in names:
                names.append(str(gamma.target))
    return names


def _scale_factors(model: GraphModule) -> List[Node]:
    """The ``div(gamma, sqrt(var + eps))`` nodes of the conv-bn QAT patterns whose gamma holds a 0."""
    found = []
    for node in model.graph.nodes:
        if node.op != "call_function" or node.target != _aten.div.Tensor or len(node.args) != 2:
            continue
        gamma, std = node.args
        feeds_batch_norm = isinstance(gamma, Node) and any(
            user.op == "call_function" and user.target in BATCH_NORM_OPS and user.args[1] is gamma
            for user in gamma.users)
        is_std = isinstance(std, Node) and std.op == "call_function" and std.target == _aten.sqrt.default
        if feeds_batch_norm and is_std and _has_zero(_attribute(model, gamma)):
            found.append(node)
    return found


def route_zero_gamma_conv_bn(model: GraphModule) -> List[str]:
    """Make the conv-bn QAT patterns of a prepared graph whose gamma holds a 0 divide by a
    nonzero ``sf`` (module docstring); returns the names of those gammas. In place."""
    routed = []
    for scale_factor in _scale_factors(model):
        gamma, std = scale_factor.args
        graph = model.graph
        with graph.inserting_after(scale_factor):
            zero = graph.call_function(_aten.eq.Scalar, (scale_factor, 0.0))
        with graph.inserting_after(zero):
            reciprocal = graph.call_function(_aten.reciprocal.default, (std,))
        with graph.inserting_after(reciprocal):
            safe = graph.call_function(_aten.where.self, (zero, reciprocal, scale_factor))
        scale_factor.replace_all_uses_with(safe, delete_user_cb=lambda user: user not in (zero, safe))
        for node, like in ((reciprocal, std), (safe, scale_factor)):
            if "val" in like.meta:
                node.meta["val"] = like.meta["val"]
        routed.append(str(gamma.target))
    if routed:
        model.recompile()
    return routed
