"""GranQ's dynamic quantize/dequantize as nodes of a ``torch.fx`` graph (converted models).

:func:`insert_dynamic_qdq` writes, before a given node, the calls of the registered ops of
:mod:`granq_ao.ops` that compute what a GranQ fake-quant computes for a :class:`GranQConfig`::

    scale, zero_point = torch.ops.granq_ao.choose_qparams_dynamic(x, b, granularity, axis, symmetric, check_finite)
    x_q   = torch.ops.granq_ao.quantize(x, scale, zero_point, b, symmetric)   # uint8 / int8 codes
    x_hat = torch.ops.granq_ao.dequantize(x_q, scale, zero_point, x)          # x where s == 0

with ``s = (x_max - x_min) / (2^b - 1)``, ``z = round(-x_min / s)`` from ``x``'s own ranges
(GranQ: per (sample, channel)), so ``x_hat == granq_ao.functional.fake_quantize(x, config)``
bit for bit. Registered ops keep a graph picklable, re-traceable and exportable
(``torch.export.save``/``load``; the loading process imports ``granq_ao`` first).

:func:`dynamic_qdq` runs the same three calls on a tensor now: reference modules call it in
``forward``, so ``torch.export`` of such a module records the same ops.

Torch-only and toolchain-free: every integration's converter may call it.
"""
from __future__ import annotations

import operator
from typing import Tuple

import torch
from torch.fx import Graph, Node

from . import ops  # noqa: F401  (registers torch.ops.granq_ao)
from .config import GranQConfig
from .granularity import PerChannel, PerSampleChannel, PerTensor

__all__ = ["op_granularity", "insert_dynamic_qdq", "insert_shared_qdq", "dynamic_qdq"]


def op_granularity(config: GranQConfig) -> Tuple[str, int]:
    """``(name, axis)`` of ``config``'s granularity as ``choose_qparams_dynamic`` takes them
    (plain literals). ``granq_iterative`` becomes ``granq`` (the same ranges, vectorized); a
    weight's ``kernel`` ranges are ``("granq", 1)`` (per (dim 0, dim 1))."""
    granularity = config.granularity
    if isinstance(granularity, PerTensor):
        return "tensor", config.axis
    if isinstance(granularity, PerChannel):
        return "channel", granularity.axis
    if isinstance(granularity, PerSampleChannel) and granularity.batch_axis == 0:
        return "granq", granularity.axis
    raise NotImplementedError(f"no dynamic q/dq op for granularity {granularity!r} (batch_axis must be 0)")


def insert_dynamic_qdq(graph: Graph, x: Node, config: GranQConfig, before: Node) -> Node:
    """Insert the ``choose_qparams_dynamic -> quantize -> dequantize`` calls of ``x`` for
    ``config`` before node ``before``; return the dequantize node (the fake-quantized value)."""
    name, axis = op_granularity(config)
    bits, symmetric = config.bits, config.symmetric
    with graph.inserting_before(before):
        qparams = graph.call_function(torch.ops.granq_ao.choose_qparams_dynamic.default,
                                      (x, bits, name, axis, symmetric, config.check_finite))
        scale = graph.call_function(operator.getitem, (qparams, 0))
        zero_point = graph.call_function(operator.getitem, (qparams, 1))
        codes = graph.call_function(torch.ops.granq_ao.quantize.default, (x, scale, zero_point, bits, symmetric))
        return graph.call_function(torch.ops.granq_ao.dequantize.default, (codes, scale, zero_point, x))


def insert_shared_qdq(graph: Graph, y: Node, source: Node, config: GranQConfig, before: Node) -> Node:
    """Insert, before ``before``, the call ``granq_ao::fake_quantize_shared(y, source, ...)``: a shared
    quantizer's later application (``y`` on the grid of ``source``'s qparams, see :mod:`granq_ao.ops`)."""
    name, axis = op_granularity(config)
    with graph.inserting_before(before):
        return graph.call_function(torch.ops.granq_ao.fake_quantize_shared.default,
                                   (y, source, config.bits, name, axis, config.symmetric, config.check_finite))


def dynamic_qdq(x: torch.Tensor, config: GranQConfig) -> torch.Tensor:
    """``dequantize(quantize(x, *choose_qparams_dynamic(x)))`` through the registered ops, now:
    the eager twin of :func:`insert_dynamic_qdq` (equal to ``functional.fake_quantize(x, config)``)."""
    name, axis = op_granularity(config)
    bits, symmetric = config.bits, config.symmetric
    scale, zero_point = torch.ops.granq_ao.choose_qparams_dynamic(x, bits, name, axis, symmetric, config.check_finite)
    codes = torch.ops.granq_ao.quantize(x, scale, zero_point, bits, symmetric)
    return torch.ops.granq_ao.dequantize(codes, scale, zero_point, x)
