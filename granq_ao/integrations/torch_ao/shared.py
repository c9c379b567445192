"""Shared quantizers: a later call reuses the qparams of the first call, as torch.ao's shared
observers do.

torch.ao gives range-preserving ops (ReLU6/Hardtanh, max/avg pooling, flatten, view, ...: its
``OUTPUT_SHARE_OBSERVER_WITH_INPUT`` ops) the fake-quant instance of their input, so one instance
is called on ``x`` and again on ``op(x_hat)``. A static observer re-quantizes the output on the
grid it already chose; a GranQ fake-quant would recompute per-(n, c) ranges from the output and
quantize a second time (conv-bn-ReLU6: values moved by up to 0.125 at 4 bits).
:func:`share_input_qparams` (run by :func:`granq_ao.prepare_qat_fx`) makes the semantics the
static one: in a prepared graph, each later call of a GranQ instance ``fq`` whose input is
``op(fq's previous call, ...)`` becomes a :class:`GranQSharedFakeQuantize` that computes::

    y_hat = fake_quantize_with_qparams(y, s, z)   s, z: the qparams of fq's FIRST call (of its
                                                  input, per (n, c)), where y keeps its (n, c) layout
    y_hat = y                                     where the layout changed (flatten of (N, C, H, W):
                                                  each value already sits on its (n, c)'s grid)

Gradient: straight-through. The owner (the instance) keeps the qparams of its latest call in
``last_qparams`` (``records_qparams``); the graph's data flow runs the owner's call first in
every forward. A disabled owner leaves its shared calls as the identity.

The shared module is registered under the name the later call used (torch.ao registered the
instance under one name per call), shares the owner's config and observer (its running ranges
still see every call, for the static export), and saves the same state_dict entries as before.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.fx import GraphModule, Node

from granq_ao import functional as granq_functional
from granq_ao.diagnostics import module_label

from .dynamic_qdq import insert_shared_quant_dequant
from .fake_quantize import GranQFakeQuantize

__all__ = ["GranQSharedFakeQuantize", "share_input_qparams"]


class GranQSharedFakeQuantize(GranQFakeQuantize):
    """A later call of a shared GranQ fake-quant ``owner`` (module docstring): fake-quantizes its
    input with the qparams of the owner's latest call where the (n, c) layout is kept, else passes
    it through. Observes like the owner (into the owner's observer)."""

    def __init__(self, owner: GranQFakeQuantize) -> None:
        if not isinstance(owner, GranQFakeQuantize) or isinstance(owner, GranQSharedFakeQuantize):
            raise TypeError(f"owner must be a GranQFakeQuantize, got {type(owner).__name__}")
        super().__init__(config=owner.config, dtype=owner.dtype)
        self.activation_post_process = owner.activation_post_process  # one observer, as before
        self.enable_fake_quant(owner.fake_quant_on)
        self.enable_observer(owner._observer_on)
        object.__setattr__(self, "_owner", owner)  # not a submodule: no second set of state_dict keys
        owner.records_qparams = True

    @property
    def owner(self) -> GranQFakeQuantize:
        return self._owner

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self._observer_on and y.numel():
            try:
                x_min, x_max = granq_functional.reduce_min_max(y.detach(), self.granularity,
                                                               check_finite=self.check_finite)
            except (ValueError, TypeError) as error:
                raise type(error)(f"{module_label(self)}: {error}") from None
            if self._observer_reuses_ranges(y.dim()):
                self.activation_post_process.record_ranges(x_min, x_max)
            else:
                self.activation_post_process(y.detach())
        qparams = self._owner.last_qparams
        if not self._fake_quant_on or qparams is None:
            return y
        return granq_functional.fake_quantize_shared(y, qparams[0], qparams[1], self.config)

    def convert(self, model: GraphModule, node: Node) -> None:
        """torch.ao's conversion hook: ``granq_ao::fake_quantize_shared(y, owner's input)``."""
        insert_shared_quant_dequant(model, node, self)

    def extra_repr(self) -> str:
        return "shares the qparams of its first call; " + super().extra_repr()


def _first_arg(node: Node) -> Optional[Node]:
    arg = node.args[0] if node.args else None
    return arg if isinstance(arg, Node) else None


def share_input_qparams(model: GraphModule) -> int:
    """Turn each later call of a GranQ activation fake-quant instance whose input is an op of
    (the output of) the instance's previous call into a :class:`GranQSharedFakeQuantize` call
    (module docstring); return how many. Other repeated calls (torch.ao's ``cat`` makes all its
    inputs share one instance) keep recomputing their ranges. In place; recompiles ``model``."""
    modules = dict(model.named_modules(remove_duplicate=False))
    previous_call = {}  # id(instance) -> its latest call node (owner or shared)
    owner_of_name = {}
    shared = 0
    for node in list(model.graph.nodes):
        if node.op != "call_module":
            continue
        module = modules.get(str(node.target))
        if not isinstance(module, GranQFakeQuantize) or isinstance(module, GranQSharedFakeQuantize):
            continue
        before = previous_call.get(id(module))
        previous_call[id(module)] = node
        source = _first_arg(node)
        if before is None or source is None or _first_arg(source) is not before:
            continue
        name = str(node.target)
        if name in owner_of_name or any(other is not node and other.op == "call_module" and str(other.target) == name
                                        for other in model.graph.nodes):
            name = _free_name(model, name + "_shared")
            node.target = name
        follower = GranQSharedFakeQuantize(module)
        _set_submodule(model, name, follower)
        owner_of_name[name] = module
        shared += 1
    if shared:
        model.recompile()
    return shared


def _free_name(model: GraphModule, base: str) -> str:
    name, index = base, 0
    while hasattr(model, name):
        index += 1
        name = f"{base}{index}"
    return name


def _set_submodule(model: GraphModule, name: str, module: torch.nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)
