"""What the GranQ quantizer looks for in an exported (ATen) graph.

* weighted ops: ``aten.conv1d/2d/3d`` (``default`` and ``padding`` overloads) and ``aten.linear``:
  input activation = ``args[0]``, weight = ``args[1]``. Transposed convolutions (output
  channels on weight dim 1) are recognised by :mod:`.transposed`.
* a weighted op's *chain*: the op, then (each the only user of the one before) a batch norm,
  then a ReLU/ReLU6 (:func:`granq_ao.relu.is_relu_call`); its last node is where the fused
  block's output is quantized. ``add`` chains the same way into a ReLU (residual blocks).
* ReLU outputs: :func:`granq_ao.relu.is_relu_call` on the ATen op (``relu``, ``relu_``,
  ``hardtanh(min_val=0)`` ...), the paper's activation points.
* pooling: ``aten.max_pool*d``, ``avg_pool*d``, ``adaptive_avg_pool*d`` (ops whose output
  torch.ao and torchao's x86 quantizer quantize with their input's quantizer).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch.fx import Node

from granq_ao.fx_graph import reaches_placeholder  # re-exported

from granq_ao.relu import is_relu_call

__all__ = ["WEIGHTED_OPS", "TRANSPOSED_CONV_OPS", "POOL_OPS", "is_weighted", "is_conv_or_linear_input_op", "is_pool",
           "is_relu_node", "is_residual_add", "chain_tail",
           "tensor_inputs", "reaches_placeholder"]

_aten = torch.ops.aten
WEIGHTED_OPS = frozenset({
    _aten.conv1d.default, _aten.conv1d.padding, _aten.conv2d.default, _aten.conv2d.padding,
    _aten.conv3d.default, _aten.conv3d.padding, _aten.linear.default,
})
#: transposed convolutions (input = ``args[0]``; their weight is not annotated)
TRANSPOSED_CONV_OPS = frozenset(getattr(packet, overload) for packet in (_aten.conv_transpose1d, _aten.conv_transpose2d,
                                                                          _aten.conv_transpose3d)
                                for overload in packet.overloads())
_BATCH_NORMS = frozenset({
    _aten.batch_norm.default, _aten._native_batch_norm_legit_no_training.default,
})
_ADDS = frozenset({_aten.add.Tensor, _aten.add_.Tensor})
POOL_OPS = frozenset(getattr(_aten, f"{kind}{dims}d").default for kind in ("max_pool", "avg_pool", "adaptive_avg_pool")
                     for dims in (1, 2, 3))


def _is_call(node: Node, targets) -> bool:
    return node.op == "call_function" and node.target in targets


def is_weighted(node: Node) -> bool:
    """A conv or linear call (its input is ``args[0]``, its weight ``args[1]``)."""
    return _is_call(node, WEIGHTED_OPS)


def is_conv_or_linear_input_op(node: Node) -> bool:
    """A conv, transposed conv or linear call: the ops whose input ``args[0]`` the ``"inputs"``
    placement quantizes."""
    return _is_call(node, WEIGHTED_OPS | TRANSPOSED_CONV_OPS)


def is_pool(node: Node) -> bool:
    """A max/average pooling call with one tensor output (its input is ``args[0]``)."""
    return _is_call(node, POOL_OPS)


def is_relu_node(node: Node) -> bool:
    """Whether ``node``'s value is a ReLU/ReLU6 output."""
    return node.op == "call_function" and is_relu_call(node.target, node.args, node.kwargs)


def _is_activation(node) -> bool:
    """A node whose value is a floating-point tensor computed from the model's inputs."""
    value = node.meta.get("val") if isinstance(node, Node) else None
    return (isinstance(value, torch.Tensor) and value.is_floating_point()
            and reaches_placeholder(node))


def tensor_inputs(node: Node) -> List[Node]:
    """The activation inputs of ``node`` (floating-point tensors that depend on a model input)."""
    return [arg for arg in node.args if _is_activation(arg)]


def is_residual_add(node: Node) -> bool:
    """An ``add`` of two activations (not a buffer update such as ``num_batches_tracked += 1``)."""
    return _is_call(node, _ADDS) and len(tensor_inputs(node)) == 2


def _only_user(node: Node) -> Optional[Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def chain_tail(node: Node) -> Node:
    """The last node of ``node`` -> [batch norm] -> [ReLU] (each the only user of the one before)."""
    tail = node
    user = _only_user(tail)
    if user is not None and _is_call(user, _BATCH_NORMS) and user.args[0] is tail:
        tail, user = user, _only_user(user)
    if user is not None and is_relu_node(user) and user.args[0] is tail:
        tail = user
    return tail
