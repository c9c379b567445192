"""Train/eval form of an exported graph that keeps every dropout's probability.

torchao 0.18's ``move_exported_model_to_train`` / ``move_exported_model_to_eval`` switch dropout
by rewriting the pattern ``F.dropout(x, p=0.5, training=...)`` with literals ignored: every
``aten.dropout(x, p, train)`` in the graph matches and is replaced by the pattern's own
``aten.dropout(x, 0.5, ...)``. Each call therefore sets every dropout to ``p = 0.5``
(torchvision's mobilenet_v2 classifier: 0.2 -> 0.5; a ``p = 0`` dropout starts dropping half),
and the exported QAT model trains a different network from the eager/FX one (measured: FX vs
PT2E max logit difference 0.58 on mobilenet_v2 in training form, 0 in eval form, where dropout is
the identity). This is torchao's code as of 2026-08 as well. The batch norms' rewrite likewise
sets every ``momentum`` and ``eps`` to the defaults (0.1, 1e-5): restored too (:mod:`.bn_literals`).

:func:`move_exported_model_to_train` / :func:`move_exported_model_to_eval` call torchao's and
then write each dropout's probability back (the rewrite keeps the dropout calls in graph order)
and each batch norm's momentum and eps.
"""
from __future__ import annotations

from typing import List

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e import move_exported_model_to_eval as _torchao_to_eval
from torchao.quantization.pt2e import move_exported_model_to_train as _torchao_to_train

from .bn_literals import batch_norm_literals, restore_batch_norm_literals

__all__ = ["move_exported_model_to_train", "move_exported_model_to_eval", "DROPOUT_OPS"]

_aten = torch.ops.aten
DROPOUT_OPS = frozenset({_aten.dropout.default, _aten.dropout_.default})  # (x, p, train)


def _dropouts(model: GraphModule) -> List[Node]:
    return [node for node in model.graph.nodes if node.op == "call_function" and node.target in DROPOUT_OPS]


def _keeping_dropout_probabilities(switch, model: GraphModule) -> GraphModule:
    probabilities = [node.args[1] for node in _dropouts(model)]
    batch_norms = batch_norm_literals(model)
    result = switch(model)
    restore_batch_norm_literals(result, batch_norms)
    after = _dropouts(result)
    if len(after) != len(probabilities):  # pragma: no cover - a torchao that removes dropout calls
        raise RuntimeError(f"{switch.__module__}.{switch.__name__} changed the number of dropout calls "
                           f"({len(probabilities)} -> {len(after)}): cannot restore their probabilities")
    changed = False
    for node, p in zip(after, probabilities):
        if node.args[1] != p:
            node.args = (node.args[0], p, *node.args[2:])
            changed = True
    if changed:
        result.recompile()
    return result


def move_exported_model_to_train(model: GraphModule) -> GraphModule:
    """torchao's ``move_exported_model_to_train`` (batch norms use batch statistics, dropout
    drops), each dropout keeping its own probability (module docstring). In place; returns ``model``."""
    return _keeping_dropout_probabilities(_torchao_to_train, model)


def move_exported_model_to_eval(model: GraphModule) -> GraphModule:
    """torchao's ``move_exported_model_to_eval`` (running statistics, dropout off), each dropout
    keeping its probability for a later :func:`move_exported_model_to_train`. In place; returns ``model``."""
    return _keeping_dropout_probabilities(_torchao_to_eval, model)
