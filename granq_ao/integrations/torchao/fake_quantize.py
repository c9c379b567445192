"""GranQPT2EFakeQuantize: GranQ's dynamic fake-quantization as a torchao PT2E ``FakeQuantizeBase``.

Output, for ``b`` bits and the ranges of the config's granularity reduced from ``x`` itself
(GranQ: one range per (sample n, channel c), recomputed at train AND eval time)::

    s = (x_max - x_min) / (2^b - 1),  z = round(-x_min / s)
    x_out = (clamp(round(x / s + z), 0, 2^b - 1) - z) * s      if fake-quant is enabled
    x_out = x                                                    otherwise

Gradient: straight-through (``dx = dx_out``). The math is :func:`granq_ao.functional.fake_quantize_dynamic`.

torchao's ``prepare_pt2e``/``prepare_qat_pt2e`` build it from a ``QuantizationSpec`` as
``ctr.with_args(dtype=, quant_min=, quant_max=, qscheme=, is_dynamic=)()``; the GranQ options
travel in ``with_args(config=GranQConfig(...))``, and the spec's grid must match the config's
(checked here). GranQ keeps no statistics: there is no observer, and ``calculate_qparams``
has nothing to give (the ranges belong to each input). ``convert_pt2e`` calls :meth:`convert`,
which writes the dynamic ``granq_ao`` q/dq ops into the graph (:mod:`granq_ao.qdq_graph`).

Bad input: NaN/inf raise :class:`~granq_ao.functional.NonFiniteInputError`, integer tensors
``TypeError``, a bad rank ``ValueError``; each message names this module in the running model.
"""
from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e import FakeQuantizeBase

from granq_ao import functional as granq_functional
from granq_ao.config import GranQConfig
from granq_ao.qdq_graph import insert_dynamic_qdq
from granq_ao.quantizer_state import EnableFlagsMixin

from .fold_bn import fold_conv_bn
from .layer_forward import conv_to_transposed_layout, transposed_to_conv_layout

__all__ = ["GranQPT2EFakeQuantize"]


class GranQPT2EFakeQuantize(EnableFlagsMixin, FakeQuantizeBase):
    r"""Dynamic GranQ fake-quant for torchao PT2E graphs (see the module docstring).

    Args:
        config: the :class:`~granq_ao.config.GranQConfig` (bits, granularity, axis, symmetric,
            fused, check_finite). Required.
        dtype, quant_min, quant_max, qscheme, is_dynamic: what torchao's prepare passes from the
            ``QuantizationSpec``; ``quant_min``/``quant_max`` must be the config's grid. ``dtype``
            defaults to the grid's (``torch.int8`` if ``config.symmetric`` else ``torch.uint8``).
        transposed_groups: (a transposed convolution's weight, ``(in, out/groups, *k)``) quantize
            the ``(out, in/groups, *k)`` view, so that ranges are per output channel (:mod:`.transposed`).
        fold_bn: (a weight's) at convert, fold the conv-bn QAT pattern it sits in
            (:mod:`.fold_bn`; ``GranQQuantizer(fold_bn=True)``).

    Attributes: ``config``, ``dtype``, ``qscheme``, ``quant_min``, ``quant_max``, ``fake_quant_on``,
    ``is_dynamic`` (False, as torchao means it: no torchao ``choose_qparams`` op is wanted; the
    ranges are nonetheless computed from each input).

    Enable flags, saved settings and labelled errors: :class:`granq_ao.quantizer_state.EnableFlagsMixin`;
    a state_dict holding no key of this module (a float checkpoint loaded into a ``quantize_``
    QAT model) leaves its state as it is (``keep_state_if_absent``).
    """

    keep_state_if_absent = True

    def __init__(self, config: Optional[GranQConfig] = None, dtype: Optional[torch.dtype] = None,
                 quant_min: Optional[int] = None, quant_max: Optional[int] = None,
                 qscheme: Optional[torch.qscheme] = None, is_dynamic: bool = False, fold_bn: bool = False,
                 transposed_groups: Optional[int] = None, **unused: Any) -> None:
        super().__init__()
        if not isinstance(config, GranQConfig):
            raise TypeError(f"GranQPT2EFakeQuantize needs config=GranQConfig(...), got {config!r}")
        if (quant_min, quant_max) not in ((None, None), (config.quant_min, config.quant_max)):
            raise ValueError(f"quant_min/quant_max ({quant_min}, {quant_max}) do not match the config's grid "
                             f"[{config.quant_min}, {config.quant_max}] ({config})")
        self.config = config
        self.dtype = dtype if dtype is not None else (torch.int8 if config.symmetric else torch.uint8)
        self.qscheme = qscheme
        self.quant_min, self.quant_max = config.quant_min, config.quant_max
        self.is_dynamic = False  # torchao's "dynamic" = its own choose_qparams ops; GranQ converts itself
        self._init_enable_flags()  # Python mirrors of the enable buffers: no device read in forward
        self.fold_bn = bool(fold_bn)  # a weight's: fold the conv-bn QAT pattern around it at convert (.fold_bn)
        # a transposed convolution's weight (in, out/groups, *k): quantized in the (out, in/groups, *k) view
        self.transposed_groups = None if transposed_groups is None else int(transposed_groups)
        # shared quantizer (see .shared): the qparams of the latest call, for the calls that reuse them
        self.records_qparams = False
        self.last_qparams = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.records_qparams:  # a shared quantizer's owner: no stale qparams if this call computes none
            self.last_qparams = None
        if not self._fake_quant_on:
            return x
        try:
            if self.transposed_groups is not None:
                groups = self.transposed_groups
                x_hat = granq_functional.fake_quantize_dynamic(transposed_to_conv_layout(x, groups), self.config)[0]
                return conv_to_transposed_layout(x_hat, groups)
            x_hat, x_min, x_max = granq_functional.fake_quantize_dynamic(x, self.config)
            if self.records_qparams and x.numel():
                self.last_qparams = granq_functional.compute_qparams(x_min, x_max, self.config.bits,
                                                                     self.config.symmetric)
            return x_hat
        except (ValueError, TypeError) as error:  # NonFiniteInputError included
            raise self.labelled(error) from None

    def calculate_qparams(self, **kwargs):
        raise NotImplementedError(
            "GranQ has no stored qparams: each input gets its own per-(sample, channel) ranges. "
            "convert_pt2e writes them as dynamic granq_ao ops (GranQPT2EFakeQuantize.convert).")

    def convert(self, model: GraphModule, node: Node) -> None:
        """torchao's conversion hook: replace this module's call ``node`` by the dynamic
        ``choose_qparams_dynamic -> quantize -> dequantize`` ops (:mod:`granq_ao.qdq_graph`); a
        disabled fake-quant is removed (its users read its input)."""
        graph = model.graph
        x = node.args[0]
        CONVERTED_SOURCES[self] = x  # for the shared calls converted after it (.shared)
        if not self._fake_quant_on:
            value = x
        elif self.transposed_groups is not None:
            with graph.inserting_before(node):
                view = graph.call_function(transposed_to_conv_layout, (x, self.transposed_groups))
            value = insert_dynamic_qdq(graph, view, self.config, before=node)
            with graph.inserting_before(node):
                value = graph.call_function(conv_to_transposed_layout, (value, self.transposed_groups))
        else:
            value = insert_dynamic_qdq(graph, x, self.config, before=node)
        node.replace_all_uses_with(value)
        graph.erase_node(node)
        if self.fold_bn:
            fold_conv_bn(graph, x, value)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["last_qparams"] = None  # a run-time value, not state
        return state

    def __setstate__(self, state):
        state.setdefault("fold_bn", False)
        state.setdefault("transposed_groups", None)
        state.setdefault("records_qparams", False)
        state.setdefault("last_qparams", None)
        super().__setstate__(state)

    def extra_repr(self) -> str:
        return f"{self.config}, fake_quant_enabled={self._fake_quant_on}"


# The input node of each converted fake-quant call (convert_pt2e goes in graph order), read by
# the shared calls converted after it.
CONVERTED_SOURCES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
