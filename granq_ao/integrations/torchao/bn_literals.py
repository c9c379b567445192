"""Keeping each batch norm's own ``eps`` and ``momentum`` through torchao's graph rewrites.

torchao 0.18 rewrites batch norms with patterns whose literals replace the model's (its own
``TODO``s say so): ``prepare_qat_pt2e``'s conv-bn QAT fusion writes ``eps=1e-5`` into
``sqrt(running_var + eps)`` and into the batch norm, and ``momentum=0.1``;
``move_exported_model_to_train/eval`` write the defaults into every batch norm again. A model
with other values (torchvision's MobileNetV3: ``eps=0.001, momentum=0.01``) then computes another
function in PT2E than in eager or FX (measured: conv-bn-hardswish, max difference 0.002 in eval
form, no quantizer involved).

:func:`batch_norm_literals` reads ``{running_var attribute: (momentum, eps)}`` from a graph;
:func:`restore_batch_norm_literals` writes them back into the batch norms and into the
``running_var + eps`` of the conv-bn QAT weight scaling. Nodes are matched by the running-variance
attribute they read (the same before and after a rewrite).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch.fx import GraphModule, Node

__all__ = ["batch_norm_literals", "restore_batch_norm_literals"]

_aten = torch.ops.aten
# op -> (index of running_var, index of momentum, index of eps) in its args
_BATCH_NORMS = {
    _aten.batch_norm.default: (4, 6, 7),
    _aten._native_batch_norm_legit.default: (4, 6, 7),
    _aten._native_batch_norm_legit_no_training.default: (4, 5, 6),
    _aten.cudnn_batch_norm.default: (4, 6, 7),
}


def _attribute(node) -> Optional[str]:
    return str(node.target) if isinstance(node, Node) and node.op in ("get_attr", "placeholder") else None


def batch_norm_literals(model: GraphModule) -> Dict[str, Tuple[float, float]]:
    """``{running_var attribute: (momentum, eps)}`` of every batch norm in ``model.graph``."""
    literals = {}
    for node in model.graph.nodes:
        positions = _BATCH_NORMS.get(node.target) if node.op == "call_function" else None
        if positions is None or len(node.args) <= positions[2]:
            continue
        key = _attribute(node.args[positions[0]])
        if key is not None:
            literals[key] = (node.args[positions[1]], node.args[positions[2]])
    return literals


def restore_batch_norm_literals(model: GraphModule, literals: Dict[str, Tuple[float, float]]) -> int:
    """Write ``literals`` back (module docstring); return how many nodes changed."""
    changed = 0
    for node in model.graph.nodes:
        if node.op != "call_function":
            continue
        positions = _BATCH_NORMS.get(node.target)
        if positions is not None and len(node.args) > positions[2]:
            key = _attribute(node.args[positions[0]])
            if key in literals:
                args = list(node.args)
                args[positions[1]], args[positions[2]] = literals[key]
                if tuple(args) != node.args:
                    node.args = tuple(args)
                    changed += 1
        elif node.target == _aten.add.Tensor and isinstance(node.args[1], float):
            key = _attribute(node.args[0])  # sqrt(running_var + eps) of the conv-bn QAT scaling
            if key in literals and node.args[1] != literals[key][1]:
                node.args = (node.args[0], literals[key][1])
                changed += 1
    if changed:
        model.recompile()
    return changed
