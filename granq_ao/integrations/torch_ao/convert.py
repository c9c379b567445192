"""Converting a GranQ QAT model (torch.ao FX) to a reference model.

``granq_ao.convert_to_reference_fx`` is torch's ``convert_to_reference_fx`` (same signature)
plus ``mode``, and it leaves the QAT model it is given as it was (torch's converts in place):

``mode="dynamic"`` (default): the reference model computes the numbers of the QAT model in eval.

* Every :class:`~granq_ao.integrations.torch_ao.GranQFakeQuantize` call in the graph becomes
  the dynamic quantize/dequantize nodes of :mod:`~granq_ao.integrations.torch_ao.dynamic_qdq`
  (ranges, qparams, integer codes, dequantize), which compute, op for op, what the fake-quant
  computes (``x_hat = (x_q - z) * s``; ``x`` itself where ``s == 0``).
* Every QAT module whose ``weight_fake_quant`` is a ``GranQFakeQuantize`` becomes its float
  module holding the *fake-quantized* weight (float values on the b-bit grid: exactly the
  tensor the QAT module uses in eval). Fused Conv/Linear-BN modules become :class:`ConvBnEval`
  (``w_q = fq(w * gamma / sqrt(var + eps))`` and the BN applied after the conv with QAT's own
  arithmetic), or with ``fold_bn=True`` the folded conv (``b = beta + (b_conv - mean) * gamma /
  sqrt(var + eps)``; equal up to float rounding). The weight layer keeps ``weight_scale`` /
  ``weight_zero_point`` buffers; :func:`weight_codes` gives the integer codes. torch's reference
  modules would re-quantize with the observer's static qparams (ranges widened to include 0,
  ``x * (1/s)`` rounding, per output channel only): not the QAT weights, and no ``kernel``.
* Everything else (torch.ao's own fake-quants: fixed-qparams ops, ``reshape``, ...) goes
  through torch's converter unchanged.

``mode="static"``: activations through torch's converter with the observers' running qparams:
``torch.quantize_per_channel(x, scale, zero_point, axis=1, quint8)`` (``quantize_per_tensor``
after a channel mismatch, see :class:`~granq_ao.integrations.torch_ao.GranQObserver`) then ``dequantize``.
Weights as in dynamic mode. Caveat of torch's representation (it does the same with its own
sub-8-bit observers): ``quantize_per_channel/per_tensor`` clamp codes to the dtype's [0, 255],
not to [0, 2^b - 1].

Fake-quants whose ``fake_quant_enabled`` is off are removed (identity), in both modes, as
the QAT model computes them. See docs/CONVERSION.md.
"""
from __future__ import annotations

import copy
import itertools
from typing import Any, Dict, Optional, Union

import torch
from torch.ao.quantization import QConfigMapping
from torch.ao.quantization.quantize_fx import convert_to_reference_fx as _torch_convert_to_reference_fx
from torch.fx import GraphModule

from granq_ao import functional as granq_functional
from granq_ao.qdq_graph import op_granularity

from .dynamic_qdq import bypass_node, fake_quant_on, insert_dynamic_quant_dequant
from .fake_quantize import GranQFakeQuantize
from .observer import GranQObserver
from .prepare import META_KEY, OBSERVED_ATTRS
from .zero_gamma import safe_scale_factor

__all__ = ["MODES", "convert_to_reference_fx", "insert_dynamic_quant_dequant", "bake_weight_module",
           "weight_codes"]

MODES = ("dynamic", "static")


# ----------------------------------------------------------------------------- weights
def _bn_scale_factor(module: torch.nn.Module) -> Optional[torch.Tensor]:
    """``gamma / sqrt(running_var + eps)`` of a fused QAT Conv/Linear-BN module (the expression
    torch's QAT forward uses, so the scaled weight is bit-identical), else None; where a gamma is
    exactly 0, ``1 / sqrt(running_var + eps)`` as the QAT module's zero-gamma-safe forward
    (:mod:`.zero_gamma`) uses."""
    bn = getattr(module, "bn", None)
    if not isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
        return None
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError(f"{type(module).__name__}: BatchNorm without running statistics cannot be converted")
    return safe_scale_factor(bn)


class ConvBnEval(torch.nn.Module):
    """A QAT Conv/Linear-BN module frozen as it computes in eval, op for op::

        y = layer(x)                      # weight: fq(w * sf) (fake-quantized), bias: zeros
        y = y / sf + b                    # sf = gamma / sqrt(running_var + eps), b: layer bias
        y = batch_norm(y, running stats)  # always the running statistics
        y = relu(y)                       # for ConvBnReLU

    Folding the BN into the bias (``y = layer(x) + beta + (b - mean) * sf``) is the same map
    up to float rounding, which can flip a later rounding of a low-bit activation; this form
    keeps the outputs equal to the QAT model's. Use ``fold_bn=True`` for the folded form.
    """

    def __init__(self, layer: torch.nn.Module, scale_factor: torch.Tensor, bias: Optional[torch.Tensor],
                 bn: torch.nn.modules.batchnorm._BatchNorm, relu: bool) -> None:
        super().__init__()
        self.layer = layer
        shape = [1] * layer.weight.dim()
        shape[1] = -1
        self.register_buffer("scale_factor", scale_factor.detach().reshape(shape).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().reshape(shape).clone())
        self.bn = bn
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x) / self.scale_factor
        if self.bias is not None:
            y = y + self.bias
        bn = self.bn
        y = torch.nn.functional.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                           False, 0.0, bn.eps)
        return torch.relu(y) if self.relu else y


@torch.no_grad()
def bake_weight_module(qat_module: torch.nn.Module, fold_bn: bool = False) -> torch.nn.Module:
    """The float form of a torch.ao QAT weighted module whose weight is the QAT module's
    fake-quantized weight in eval (the very tensor its forward uses).

    Plain and ReLU-fused modules become their float modules (``to_float()``). Conv/Linear-BN
    modules become :class:`ConvBnEval` (exact), or with ``fold_bn=True`` the float module with
    BN folded into the bias (``to_float()``'s fold; equal up to float rounding). The layer holding
    the weight gets buffers ``weight_scale``/``weight_zero_point`` (see :func:`weight_codes`).
    ``qconfig`` is set to None so that torch's converter leaves the module alone.
    """
    weight_fake_quant = qat_module.weight_fake_quant
    weight = qat_module.weight
    scale_factor = _bn_scale_factor(qat_module)
    if scale_factor is not None:
        shape = [1] * weight.dim()
        shape[0] = -1
        weight = weight * scale_factor.reshape(shape)
    observer_was_on = bool(weight_fake_quant.observer_enabled[0])
    weight_fake_quant.disable_observer()
    try:
        weight_q = weight_fake_quant(weight)
    finally:
        if observer_was_on:
            weight_fake_quant.enable_observer()
    float_module = qat_module.to_float()
    relu = isinstance(float_module, torch.nn.Sequential)
    layer = float_module[0] if relu else float_module
    layer.weight = torch.nn.Parameter(weight_q.detach().clone(), requires_grad=False)
    if isinstance(weight_fake_quant, GranQFakeQuantize) and fake_quant_on(weight_fake_quant):
        name, axis = op_granularity(weight_fake_quant.config)
        scale, zero_point = granq_functional.compute_qparams(*granq_functional.reduce_min_max(weight, name, axis),
                                              weight_fake_quant.bits, weight_fake_quant.symmetric)
        layer.register_buffer("weight_scale", scale)
        layer.register_buffer("weight_zero_point", zero_point)
        layer.weight_bits = weight_fake_quant.bits
        layer.weight_symmetric = weight_fake_quant.symmetric
    if scale_factor is not None and not fold_bn:
        bn = copy.deepcopy(qat_module.bn).eval()
        bias = None if qat_module.bias is None else qat_module.bias.detach()
        # torch's QAT forward convolves with an explicit zero bias; so does this layer.
        layer.bias = torch.nn.Parameter(layer.weight.new_zeros(layer.weight.shape[0]), requires_grad=False)
        float_module = ConvBnEval(layer, scale_factor, bias, bn, relu)
    float_module.train(qat_module.training)
    float_module.qconfig = None
    return float_module


def _weight_layer(module: torch.nn.Module) -> torch.nn.Module:
    if isinstance(module, ConvBnEval):
        return module.layer
    return module[0] if isinstance(module, torch.nn.Sequential) else module


def weight_codes(module: torch.nn.Module) -> torch.Tensor:
    """Integer codes of a weight baked by :func:`bake_weight_module`: ``weight`` is exactly
    ``dequantize(weight_codes(module), weight_scale, weight_zero_point)``."""
    target = _weight_layer(module)
    if not hasattr(target, "weight_scale"):
        raise ValueError(f"{type(module).__name__} holds no baked quantized weight")
    return granq_functional.quantize(target.weight, target.weight_scale, target.weight_zero_point,
                      target.weight_bits, target.weight_symmetric)


# ----------------------------------------------------------------------------- the converter
def _float_weight_in_qat(module: torch.nn.Module) -> bool:
    """Whether ``module`` has a weight and a qconfig that quantizes weights, but no weight
    fake-quant: torch.ao has no QAT module for it (ConvTranspose1d/2d/3d, ...), so QAT computes
    with the float weight, while torch's converter would swap in a reference module that
    quantizes the weight with the qconfig's observer: a model that differs from QAT."""
    qconfig = getattr(module, "qconfig", None)
    if qconfig is None or getattr(qconfig, "weight", None) is None or hasattr(module, "weight_fake_quant"):
        return False
    layer = module[0] if isinstance(module, torch.ao.nn.intrinsic._FusedModule) else module
    return isinstance(getattr(layer, "weight", None), torch.Tensor)


def _set_module(model: torch.nn.Module, qualified_name: str, module: torch.nn.Module) -> None:
    parent_name, _, name = qualified_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, name, module)


def _check_static(graph_module: GraphModule) -> None:
    """``ValueError`` for a model that is not float32 (torch's static quantize ops take float32
    only), or naming the first GranQ activation fake-quant whose observer has recorded no batch:
    static qparams would be placeholders (scale 1, one channel), which fail at inference or
    silently give wrong outputs."""
    dtypes = {t.dtype for t in itertools.chain(graph_module.parameters(), graph_module.buffers())
              if t.is_floating_point()} - {torch.float32}
    if dtypes:
        raise ValueError(
            f"mode='static' emits torch.quantize_per_channel/per_tensor, which take float32 only, but the "
            f"model holds {', '.join(sorted(map(str, dtypes)))} tensors: convert model.float() first, "
            "or use mode='dynamic' (any float dtype).")
    modules = dict(graph_module.named_modules(remove_duplicate=False))
    for node in graph_module.graph.nodes:
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        observer = getattr(module, "activation_post_process", None)
        if (isinstance(module, GranQFakeQuantize) and fake_quant_on(module)
                and isinstance(observer, GranQObserver) and not observer.has_data):
            raise ValueError(
                f"mode='static' needs the observers' running ranges, but {node.target!r} has seen no "
                "data: run the QAT model on representative batches first (with observers enabled, "
                "e.g. a few batches in train mode), or convert with mode='dynamic' (ranges from each input).")


def convert_to_reference_fx(graph_module: GraphModule,
                            convert_custom_config=None,
                            _remove_qconfig: bool = True,
                            qconfig_mapping: Union[QConfigMapping, Dict[str, Any], None] = None,
                            backend_config=None,
                            mode: str = "dynamic", fold_bn: bool = False) -> GraphModule:
    """torch's ``convert_to_reference_fx`` for models prepared with GranQ qconfigs.

    ``mode="dynamic"`` (default): the reference model's outputs equal the QAT model's in eval
    (dynamic per-(n, c) quantize/dequantize nodes, fake-quantized weights).
    ``mode="static"``: torch's static export with the observers' running qparams.
    In both modes GranQ-quantized weights are the QAT model's fake-quantized weights.
    ``fold_bn``: fold BatchNorm into the conv/linear bias (torch's deployment form; equal to QAT
    up to float rounding) instead of keeping QAT's exact arithmetic (:class:`ConvBnEval`).
    Unlike torch's, it converts a copy: ``graph_module`` (the QAT model) stays as it was and can
    go on training or be converted again. See the module docstring.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(graph_module, GraphModule):
        raise TypeError(f"expected a GraphModule from prepare_qat_fx/prepare_fx, got {type(graph_module).__name__}")
    observed_attrs = graph_module.meta.get(META_KEY, getattr(graph_module, OBSERVED_ATTRS, None))
    if mode == "static":
        _check_static(graph_module)
    graph_module = copy.deepcopy(graph_module)
    if META_KEY not in graph_module.meta:
        if observed_attrs is None:
            raise ValueError(
                "this GraphModule holds no prepare metadata: it was not made by prepare_qat_fx, or it "
                "was prepared by torch.ao's prepare_qat_fx and then saved whole and loaded (pickling "
                "drops GraphModule.meta, which torch.ao's converter needs), or it is a copy.deepcopy of "
                "a loaded model. To save a QAT model so that it converts: prepare with granq_ao.prepare_qat_fx, "
                "whose models convert after torch.save/torch.load (it keeps the metadata in an attribute "
                "that pickling keeps); or save model.state_dict(), then prepare the float model again and "
                "load_state_dict() into it.")
        graph_module.meta[META_KEY] = copy.deepcopy(observed_attrs)  # torch.load drops meta
    modules = dict(graph_module.named_modules(remove_duplicate=False))
    for node in list(graph_module.graph.nodes):
        if node.op != "call_module":
            continue
        module = modules.get(str(node.target))
        if isinstance(module, GranQFakeQuantize):
            if mode == "dynamic":
                module.convert(graph_module, node)  # dynamic q/dq; a shared call reuses its owner's input
            elif not fake_quant_on(module):
                bypass_node(graph_module.graph, node)
        elif isinstance(getattr(module, "weight_fake_quant", None), GranQFakeQuantize):
            _set_module(graph_module, str(node.target), bake_weight_module(module, fold_bn=fold_bn))
        elif _float_weight_in_qat(module):
            module.qconfig = None  # QAT ran it with its float weight: so does the reference model
    graph_module.graph.lint()
    graph_module.recompile()
    return _torch_convert_to_reference_fx(graph_module, convert_custom_config=convert_custom_config,
                                          _remove_qconfig=_remove_qconfig,
                                          qconfig_mapping=qconfig_mapping,
                                          backend_config=backend_config)
