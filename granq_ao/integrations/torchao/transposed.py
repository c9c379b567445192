"""Transposed convolutions in PT2E: their weights get per-output-channel ranges, as in ``quantize_``.

``aten.conv_transpose{1,2,3}d.input(x, weight, bias, stride, padding, output_padding, groups,
dilation)`` stores its weight as ``(in, out / groups, *k)``: output channel ``o = g * out/groups + j``
lives on dims (0 by group, 1). The weight fake-quant (``GranQPT2EFakeQuantize(transposed_groups=g)``)
quantizes the ``(out, in / groups, *k)`` view (:func:`.layer_forward.transposed_to_conv_layout`,
the ``quantize_`` path's) with the weight config (per output channel) and moves back; its
converted graph does the same around the dynamic q/dq ops.
"""
from __future__ import annotations

import torch
from torch.fx import Node

__all__ = ["TRANSPOSED_CONV_OPS", "is_transposed_conv", "transposed_groups"]

_aten = torch.ops.aten
TRANSPOSED_CONV_OPS = frozenset({_aten.conv_transpose1d.default, _aten.conv_transpose2d.input,
                                 _aten.conv_transpose3d.input})


def is_transposed_conv(node: Node) -> bool:
    """A transposed convolution call (input ``args[0]``, weight ``args[1]``)."""
    return node.op == "call_function" and node.target in TRANSPOSED_CONV_OPS


def transposed_groups(node: Node) -> int:
    """The ``groups`` argument of a transposed convolution call (default 1)."""
    if len(node.args) > 6:
        return int(node.args[6])
    return int(node.kwargs.get("groups", 1))
