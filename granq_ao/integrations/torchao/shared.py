"""Shared quantizers in PT2E: the output of a range-preserving op reuses the qparams of the
fake-quant of its input, as torch.ao's shared observers do (and as the FX path does,
``granq_ao.integrations.torch_ao.shared``).

:class:`GranQPT2ESharedFakeQuantize` is what :func:`shared_spec` makes ``prepare_qat_pt2e``
insert on such an op's output ``y``::

    y_hat = fake_quantize_with_qparams(y, s, z)   s, z: the qparams of the owner's latest call
                                                  (the fake-quant of the op's input, per (n, c)),
                                                  where y keeps its (n, c) layout
    y_hat = y                                     where the layout changed (a flatten of (N, C, H, W))

Gradient: straight-through. The owner is found by :func:`link_shared_fake_quants` (the
quantizer's ``prepare_obs_or_fq_callback``): the fake-quant of the op's input value, or, for a
chain of shared ops (ReLU6 -> pool -> flatten), the owner of the first. The graph's data flow
runs the owner's call first in every forward; a disabled owner leaves its shared calls as the
identity. ``convert_pt2e`` writes ``granq_ao::fake_quantize_shared(y, owner's input)``.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e.quantizer import QuantizationSpec

from granq_ao import functional as granq_functional
from granq_ao.config import GranQConfig
from granq_ao.qdq_graph import insert_shared_qdq

from .fake_quantize import CONVERTED_SOURCES, GranQPT2EFakeQuantize
from .specs import granq_spec

__all__ = ["GranQPT2ESharedFakeQuantize", "shared_spec", "link_shared_fake_quants"]


class GranQPT2ESharedFakeQuantize(GranQPT2EFakeQuantize):
    """The fake-quant of a range-preserving op's output that reuses its owner's qparams
    (module docstring). ``owner`` is set by :func:`link_shared_fake_quants`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "_owner", None)  # not a submodule: no second set of state_dict keys

    @property
    def owner(self) -> Optional[GranQPT2EFakeQuantize]:
        return self._owner

    def set_owner(self, owner: GranQPT2EFakeQuantize) -> None:
        if not isinstance(owner, GranQPT2EFakeQuantize) or isinstance(owner, GranQPT2ESharedFakeQuantize):
            raise TypeError(f"owner must be a GranQPT2EFakeQuantize, got {type(owner).__name__}")
        object.__setattr__(self, "_owner", owner)
        owner.records_qparams = True

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self._owner is None:
            raise RuntimeError("GranQPT2ESharedFakeQuantize has no owner: it is inserted by prepare_qat_pt2e with "
                               "GranQQuantizer, whose prepare_obs_or_fq_callback links it")
        qparams = self._owner.last_qparams
        if not self._fake_quant_on or qparams is None:
            return y
        return granq_functional.fake_quantize_shared(y, qparams[0], qparams[1], self.config)

    def convert(self, model: GraphModule, node: Node) -> None:
        """``granq_ao::fake_quantize_shared(y, owner's input)``; removed when it or its owner is off."""
        graph = model.graph
        y = node.args[0]
        source = CONVERTED_SOURCES.get(self._owner)
        if self._fake_quant_on and self._owner is not None and self._owner.fake_quant_on:
            if source is None:
                raise RuntimeError(f"{node.name}: the call of its owner fake-quant was not converted before it")
            y = insert_shared_qdq(graph, y, source, self.config, before=node)
        node.replace_all_uses_with(y)
        graph.erase_node(node)

    def extra_repr(self) -> str:
        return "shares the qparams of its owner; " + super().extra_repr()


def shared_spec(config: GranQConfig) -> QuantizationSpec:
    """The spec of a shared op's output: :func:`.specs.granq_spec` with the shared class."""
    spec = granq_spec(config)
    return QuantizationSpec(dtype=spec.dtype, observer_or_fake_quant_ctr=GranQPT2ESharedFakeQuantize.with_args(config=config),
                            quant_min=spec.quant_min, quant_max=spec.quant_max, qscheme=spec.qscheme,
                            ch_axis=spec.ch_axis, is_dynamic=False)


def link_shared_fake_quants(model: GraphModule, edge_or_node_to_obs_or_fq: Dict) -> int:
    """Give each :class:`GranQPT2ESharedFakeQuantize` (on the output of node ``y``) its owner: the
    fake-quant of ``y``'s input ``u`` (``u``'s output, or the edge ``(u, y)``); if that is a shared
    one too, its owner. Nodes in graph order. Returns how many were linked."""
    linked = 0
    for node in model.graph.nodes:
        shared = edge_or_node_to_obs_or_fq.get(node)
        if not isinstance(shared, GranQPT2ESharedFakeQuantize):
            continue
        source = node.args[0] if node.args and isinstance(node.args[0], Node) else None
        owner = edge_or_node_to_obs_or_fq.get(source) or edge_or_node_to_obs_or_fq.get((source, node))
        if isinstance(owner, GranQPT2ESharedFakeQuantize):
            owner = owner.owner
        if not isinstance(owner, GranQPT2EFakeQuantize):
            raise RuntimeError(f"GranQQuantizer: the shared fake-quant of {node.name!r} has no GranQ fake-quant "
                               f"on its input {getattr(source, 'name', source)!r}")
        shared.set_owner(owner)
        linked += 1
    return linked
