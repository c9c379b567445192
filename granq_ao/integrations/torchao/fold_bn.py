"""Folding conv-BN at ``convert_pt2e`` (``GranQQuantizer(..., fold_bn=True)``).

``prepare_qat_pt2e`` rewrites ``conv -> batch_norm`` into torchao's simulated fold::

    sf = gamma / sqrt(running_var + eps)
    y  = batch_norm(conv(x, fq(w * sf), None) / sf [+ b], gamma, beta, running_mean, running_var)

torchao's own fold at convert (``_fold_conv_bn_qat``) matches only its ``quantized_decomposed``
q/dq ops. When the weight fake-quant of such a pattern converts itself (it sits on ``w * sf``),
:func:`fold_conv_bn` rewrites the rest of the pattern into the deployment form::

    y = conv(x, fq(w * sf), beta + (b - running_mean) * sf)

with the running statistics (also if the graph is in training form, as torchao's fold does):
no batch norm is left. Mathematically the same map as QAT in eval; the float rounding differs
(``conv / sf * gamma / std`` against ``conv``), and a low-bit activation quantizer downstream
turns a rare one-ulp difference at a rounding boundary into a full step, so it is an option
(``fold_bn=False``, the default, keeps QAT's arithmetic and equals it bit for bit), as
``granq_ao.convert_to_reference_fx(..., fold_bn=True)`` is for FX.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.fx import Graph, Node

__all__ = ["fold_conv_bn"]

_aten = torch.ops.aten
_CONVS = frozenset({_aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default, _aten.conv1d.padding,
                    _aten.conv2d.padding, _aten.conv3d.padding, _aten.conv_transpose1d.default,
                    _aten.conv_transpose2d.input, _aten.conv_transpose3d.input})
_DIVS = frozenset({_aten.div.Tensor})
_MULS = frozenset({_aten.mul.Tensor})
_ADDS = frozenset({_aten.add.Tensor})
_RESHAPES = frozenset({_aten.reshape.default, _aten.view.default})
_TRAIN_BN = _aten.batch_norm.default  # (x, weight, bias, mean, var, training, momentum, eps, cudnn)
_EVAL_BN = _aten._native_batch_norm_legit_no_training.default  # (x, weight, bias, mean, var, momentum, eps)


def _is(node, targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def _only_user(node: Node) -> Optional[Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def fold_conv_bn(graph: Graph, scaled_weight: Node, weight_value: Node) -> bool:
    """Fold the BN of the conv-bn QAT pattern whose scaled weight ``w * sf`` is ``scaled_weight``
    (the weight fake-quant's input) and whose conv now reads ``weight_value`` (the fake-quant's
    replacement); return whether the pattern was found and folded (module docstring)."""
    if not _is(scaled_weight, _MULS):
        return False
    reshaped_sf = scaled_weight.args[1]
    if not _is(reshaped_sf, _RESHAPES) or not _is(reshaped_sf.args[0], _DIVS):
        return False
    sf = reshaped_sf.args[0]  # gamma / sqrt(var + eps)
    conv = _only_user(weight_value)
    if not _is(conv, _CONVS) or conv.args[1] is not weight_value:
        return False
    zero_bias = conv.args[2] if len(conv.args) > 2 else None  # the pattern's conv runs without its bias
    if zero_bias is not None and not _is(zero_bias, {_aten.zeros_like.default}):
        return False
    divided = _only_user(conv)
    if not _is(divided, _DIVS) or divided.args[0] is not conv:
        return False
    tail, bias = divided, None
    user = _only_user(divided)
    if _is(user, _ADDS) and user.args[0] is divided and _is(user.args[1], _RESHAPES):
        tail, bias, user = user, user.args[1].args[0], _only_user(user)
    if _is(user, {_TRAIN_BN}) and user.args[0] is tail:
        bn, bn_out = user, user
        gamma, beta, mean = user.args[1], user.args[2], user.args[3]
    elif _is(user, {_EVAL_BN}) and user.args[0] is tail:
        getitems = list(user.users)
        if len(getitems) != 1 or getitems[0].args[1] != 0:
            return False
        bn, bn_out = user, getitems[0]
        gamma, beta, mean = user.args[1], user.args[2], user.args[3]
    else:
        return False
    if gamma is None or beta is None or sf.args[0] is not gamma:
        return False
    with graph.inserting_before(conv):
        shifted = graph.call_function(_aten.sub.Tensor, (bias, mean)) if bias is not None else \
            graph.call_function(_aten.neg.default, (mean,))
        new_bias = graph.call_function(_aten.add.Tensor, (beta, graph.call_function(_aten.mul.Tensor, (shifted, sf))))
    conv.args = (conv.args[0], conv.args[1], new_bias, *conv.args[3:])
    bn_out.replace_all_uses_with(conv)
    for node in (bn_out, bn) if bn_out is not bn else (bn,):
        graph.erase_node(node)
    if tail is not divided:
        graph.erase_node(tail)
    graph.erase_node(divided)
    if zero_bias is not None and not zero_bias.users:
        graph.erase_node(zero_bias)
    return True
