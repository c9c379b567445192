"""``granq_ao.prepare_qat_fx``: torch.ao's ``prepare_qat_fx`` (same signature) plus the
activation placement that a :class:`~.qconfig.GranQQConfigMapping` asks for."""
from __future__ import annotations

from typing import Any, Dict, Tuple, Union

import torch
from torch.ao.quantization import QConfigMapping
from torch.ao.quantization.quantize_fx import prepare_qat_fx as _torch_prepare_qat_fx
from torch.fx import GraphModule

from .placement import apply_paper_placement


def prepare_qat_fx(model: torch.nn.Module, qconfig_mapping: Union[QConfigMapping, Dict[str, Any]],
                   example_inputs: Tuple[Any, ...], prepare_custom_config=None,
                   backend_config=None) -> GraphModule:
    """Like ``torch.ao.quantization.quantize_fx.prepare_qat_fx``; with a mapping made by
    ``get_granq_qat_qconfig_mapping(act_placement="paper")`` it then keeps activation
    fake-quants on ReLU/ReLU6 outputs only (``granq_ao.placement``)."""
    prepared = _torch_prepare_qat_fx(model, qconfig_mapping, example_inputs,
                                     prepare_custom_config=prepare_custom_config,
                                     backend_config=backend_config)
    if getattr(qconfig_mapping, "act_placement", "all") == "paper":
        apply_paper_placement(prepared)
    return prepared
