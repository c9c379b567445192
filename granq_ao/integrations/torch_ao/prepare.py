"""``granq_ao.prepare_qat_fx``: torch.ao's ``prepare_qat_fx`` (same signature) plus the
activation placement that a :class:`~.qconfig.GranQQConfigMapping` asks for.

It also refuses a model that is already prepared (torch.ao's fails inside its tracer, or
prepares twice) and keeps the prepare metadata torch.ao's converter needs in a plain attribute
(:data:`OBSERVED_ATTRS`), so that a prepared model saved whole (``torch.save``) and loaded
again can still be converted by :func:`granq_ao.convert_to_reference_fx` (torch.ao keeps it in
``GraphModule.meta``, which pickling drops).

torch.ao registers a fake-quant shared by several ops (pooling, flatten, view reuse their input's)
under one name per op. Pickling re-traces the graph and keeps only the first name, so a model
loaded again would have fewer state_dict keys than the one saved. ``prepare_qat_fx`` therefore
calls each shared instance by its first name only (:func:`merge_aliases`): same modules, same
numbers, and the same state_dict before and after pickling.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Tuple, Union

import torch
from torch.ao.quantization import QConfig, QConfigMapping
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.ao.quantization.observer import ObserverBase
from torch.ao.quantization.quantize_fx import prepare_qat_fx as _torch_prepare_qat_fx
from torch.fx import GraphModule
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from .input_placement import apply_input_placement, count_weighted_inputs
from .placement import apply_paper_placement, count_activation_fake_quant_calls
from .qconfig import GranQQConfigMapping, PlacementWarning, picklable_qconfig
from .shared import share_input_qparams
from .training_flag import check_training_branches, make_training_flags_live
from .zero_gamma import route_zero_gamma_batchnorm

__all__ = ["prepare_qat_fx", "check_not_prepared", "merge_aliases", "OBSERVED_ATTRS", "META_KEY"]

META_KEY = "_observed_graph_module_attrs"  # where torch.ao's prepare leaves its metadata
OBSERVED_ATTRS = "granq_observed_attrs"    # our copy of it, an attribute that pickling keeps


def check_not_prepared(model: torch.nn.Module) -> None:
    """``ValueError`` if ``model`` already holds fake-quant or observer modules (it was prepared)."""
    prepared = [name for name, module in model.named_modules()
                if isinstance(module, (FakeQuantizeBase, ObserverBase))]
    if prepared or META_KEY in getattr(model, "meta", {}) or hasattr(model, OBSERVED_ATTRS):
        where = f" (e.g. {prepared[0]!r})" if prepared else ""
        raise ValueError(
            f"the model is already prepared for QAT: it holds fake-quant/observer modules{where}. "
            "Pass the float model to prepare_qat_fx; to restore a trained QAT model, prepare the "
            "float model again and load_state_dict() into it.")


def _make_qconfigs_picklable(prepared: GraphModule, attrs: Any) -> None:
    """Rewrap every qconfig torch.ao stored (on the modules and per node) with picklable
    constructors, whatever mapping it came from (e.g. torch's default mapping with a GranQ
    global qconfig: its fixed-qparams constructors carry torch.ao's local function too)."""
    for module in prepared.modules():
        if isinstance(getattr(module, "qconfig", None), QConfig):
            module.qconfig = picklable_qconfig(module.qconfig)
    for name in ("node_name_to_qconfig", "equalization_node_name_to_qconfig"):
        table = getattr(attrs, name, None)
        if isinstance(table, dict):
            for key, qconfig in table.items():
                if isinstance(qconfig, QConfig):
                    table[key] = picklable_qconfig(qconfig)


def merge_aliases(prepared: GraphModule) -> Dict[str, str]:
    """Make every graph call of a fake-quant/observer registered under several names use its first
    name (the one ``named_modules()`` and pickling keep) and delete the other names; returns
    ``{alias: first name}``."""
    first: Dict[int, str] = {}
    for name, module in prepared.named_modules(remove_duplicate=False):
        first.setdefault(id(module), name)
    aliases: Dict[str, str] = {}
    for node in prepared.graph.nodes:
        if node.op != "call_module":
            continue
        module = prepared.get_submodule(str(node.target))
        name = first[id(module)]
        if name != node.target and isinstance(module, (FakeQuantizeBase, ObserverBase)):
            aliases[str(node.target)] = name
            node.target = name
    for alias in aliases:
        prepared.delete_submodule(alias)
    if aliases:
        prepared.recompile()
    return aliases


_PLACEMENT_FOUND = {
    "paper": "the paper placement quantizes ReLU/ReLU6 outputs only and this model has none",
    "inputs": "this model has no quantized conv/linear",
    "all": "torch.ao quantized no op of this model",
}


def prepare_qat_fx(model: torch.nn.Module, qconfig_mapping: Union[QConfigMapping, Dict[str, Any]],
                   example_inputs: Tuple[Any, ...], prepare_custom_config=None,
                   backend_config=None) -> GraphModule:
    """Like ``torch.ao.quantization.quantize_fx.prepare_qat_fx``; with a mapping made by
    ``get_granq_qat_qconfig_mapping(act_placement="paper")`` it then keeps activation
    fake-quants on ReLU/ReLU6 outputs only (:mod:`.placement`), with ``"inputs"`` on the inputs of
    conv/linear layers only (:mod:`.input_placement`), and warns
    (:class:`~granq_ao.config.PlacementWarning`, naming how many conv/linear inputs ``"inputs"``
    would quantize) if the placement leaves no activation fake-quant. A fake-quant instance that
    torch.ao shares between an op's input and output then reuses its first call's qparams at its
    later calls (:func:`~.shared.share_input_qparams`); any other fake-quant called under several
    names is called by one (:func:`merge_aliases`, so that pickling keeps every state_dict key).
    Fused Conv-BN modules whose BN weight holds an exact 0 get a forward that does not divide by
    it (:mod:`.zero_gamma`). Functional calls whose training flag tracing froze
    (``F.dropout(x, p, self.training)``, ``F.batch_norm``) read the live ``training`` flag again; a
    model with another branch on ``self.training`` is refused (``ValueError``; :mod:`.training_flag`).
    ``ValueError`` for a model that is already prepared."""
    check_not_prepared(model)
    check_training_branches(model)
    prepared = _torch_prepare_qat_fx(model, qconfig_mapping, example_inputs,
                                     prepare_custom_config=prepare_custom_config,
                                     backend_config=backend_config)
    route_zero_gamma_batchnorm(prepared)  # BN weights of exactly 0: finite outputs (.zero_gamma)
    make_training_flags_live(prepared)  # F.dropout(x, training=self.training) & co. follow .eval()
    placement = getattr(qconfig_mapping, "act_placement", "all")
    if placement == "paper":
        apply_paper_placement(prepared)
    elif placement == "inputs":
        apply_input_placement(prepared)
    share_input_qparams(prepared)  # a shared instance's later calls reuse its first call's qparams
    merge_aliases(prepared)
    if isinstance(qconfig_mapping, GranQQConfigMapping) and count_activation_fake_quant_calls(prepared) == 0:
        warnings.warn(
            f"act_placement={placement!r} left 0 activation fake-quants ({_PLACEMENT_FOUND[placement]}), so "
            f"this model's activations stay float; act_placement='inputs' would quantize the "
            f"{count_weighted_inputs(prepared)} conv/linear input(s).", PlacementWarning, stacklevel=2)
    # An attribute survives pickling; listed as preserved, it survives deepcopy too.
    attrs = prepared.meta[META_KEY]
    _make_qconfigs_picklable(prepared, attrs)
    prepared.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})[OBSERVED_ATTRS] = attrs
    setattr(prepared, OBSERVED_ATTRS, attrs)
    return prepared
