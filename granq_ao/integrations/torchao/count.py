"""What a prepared PT2E graph fake-quantizes: GranQ fake-quant calls, weights apart from activations."""
from __future__ import annotations

from typing import Dict, List

from torch.fx import GraphModule

from .fake_quantize import GranQPT2EFakeQuantize
from .patterns import reaches_placeholder

__all__ = ["granq_fake_quant_calls"]


def granq_fake_quant_calls(model: GraphModule) -> Dict[str, List[str]]:
    """``{"activation": [...], "weight": [...]}``: the names of the graph nodes that call a
    :class:`GranQPT2EFakeQuantize`, one per call (a shared instance counts at each call). A
    call is a weight's when its input depends on no graph input (a parameter, or a parameter
    scaled by batch-norm statistics in a conv-bn QAT pattern)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    calls: Dict[str, List[str]] = {"activation": [], "weight": []}
    for node in model.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(str(node.target)), GranQPT2EFakeQuantize):
            kind = "activation" if reaches_placeholder(node.args[0]) else "weight"
            calls[kind].append(node.name)
    return calls
