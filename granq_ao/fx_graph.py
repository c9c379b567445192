"""Small facts about torch.fx graphs that several integrations need (core: imports torch only)."""
from __future__ import annotations

from torch.fx import Node

__all__ = ["reaches_placeholder"]


def reaches_placeholder(node: Node) -> bool:
    """Whether ``node``'s value depends on a graph input (an activation, not a parameter)."""
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder":
            return True
        stack.extend(current.all_input_nodes)
    return False
