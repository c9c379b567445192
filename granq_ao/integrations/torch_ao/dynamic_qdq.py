"""Dynamic quantize/dequantize nodes for a GranQ fake-quant call in a torch.fx graph.

:func:`insert_dynamic_quant_dequant` replaces the call of a GranQ fake-quant module by
calls of the registered ops of :mod:`granq_ao.ops` that compute, op for op, what the module
computes in eval::

    scale, zero_point = torch.ops.granq_ao.choose_qparams_dynamic(x, bits, granularity, axis, symmetric, check_finite)
    x_q = torch.ops.granq_ao.quantize(x, scale, zero_point, bits, symmetric)  # uint8 / int8 codes
    x_hat = torch.ops.granq_ao.dequantize(x_q, scale, zero_point, x)          # x where s == 0

Registered ops keep the graph picklable and re-traceable (``torch.save`` of the whole model).
The node writing is :func:`granq_ao.qdq_graph.insert_dynamic_qdq` (shared with the torchao
integration); this module adds what is torch.ao's: the module call it replaces, a disabled
fake-quant removed.

It is used by :func:`granq_ao.convert_to_reference_fx` and by the fake-quant's own ``convert``
hook (torch.ao's decomposed converters call it). It reads the module's public attributes only
(``fake_quant_on``, ``config``), so it does not import the module's class.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.fx import GraphModule, Node

import weakref

from granq_ao.qdq_graph import insert_dynamic_qdq, insert_shared_qdq

__all__ = ["insert_dynamic_quant_dequant", "insert_shared_quant_dequant", "fake_quant_on", "bypass_node",
           "record_converted_source"]


def fake_quant_on(fake_quant: torch.nn.Module) -> bool:
    """Whether the fake-quant quantizes in forward (the Python mirror its forward reads, else
    torch.ao's buffer)."""
    return bool(getattr(fake_quant, "fake_quant_on", fake_quant.fake_quant_enabled[0]))


def bypass_node(graph: torch.fx.Graph, node: Node) -> Node:
    """Remove the call ``node`` (a disabled fake-quant): its users read its input instead."""
    source = node.args[0]
    node.replace_all_uses_with(source)
    graph.erase_node(node)
    return source


def insert_dynamic_quant_dequant(model: GraphModule, node: Node,
                                 fake_quant: Optional[torch.nn.Module] = None) -> Node:
    """Replace the call ``node`` of a ``GranQFakeQuantize`` in ``model.graph`` by the dynamic
    ``choose_qparams_dynamic -> quantize -> dequantize`` op calls (module docstring);
    return the node that now holds its value. A fake-quant with ``fake_quant_enabled`` off is
    removed (its input is returned). ``model.recompile()`` is left to the caller."""
    graph = model.graph
    if fake_quant is None:
        fake_quant = model.get_submodule(str(node.target))
    x = node.args[0]
    if not fake_quant_on(fake_quant):
        return bypass_node(graph, node)
    x_hat = insert_dynamic_qdq(graph, x, fake_quant.config, before=node)
    node.replace_all_uses_with(x_hat)
    graph.erase_node(node)
    return x_hat


# The input node of each converted fake-quant call, for the shared calls converted after it
# (a shared quantizer's later calls reuse the qparams of its first call's input).
_CONVERTED_SOURCES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def record_converted_source(fake_quant: torch.nn.Module, node: Node) -> None:
    """Remember the input of ``fake_quant``'s call ``node`` (converters go in graph order)."""
    _CONVERTED_SOURCES[fake_quant] = node.args[0]


def insert_shared_quant_dequant(model: GraphModule, node: Node, shared: torch.nn.Module) -> Node:
    """Replace the call ``node`` of a ``GranQSharedFakeQuantize`` (a shared quantizer's later
    call) by ``granq_ao::fake_quantize_shared(y, source, ...)``, ``source`` being the input of its
    owner's call, converted before it. Removed when it or its owner is disabled."""
    graph = model.graph
    source = _CONVERTED_SOURCES.get(shared.owner)
    if not fake_quant_on(shared) or not fake_quant_on(shared.owner):
        return bypass_node(graph, node)
    if source is None:
        raise RuntimeError(f"{node.name}: the call of its owner fake-quant was not converted before it")
    y_hat = insert_shared_qdq(graph, node.args[0], source, shared.config, before=node)
    node.replace_all_uses_with(y_hat)
    graph.erase_node(node)
    return y_hat
