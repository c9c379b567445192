"""``granq_quant_cfg``: the ``mtq.quantize`` config of a :class:`~granq_ao.config.GranQScheme`.

The config is modelopt 0.47's list form::

    {"quant_cfg": [
        {"quantizer_name": "*", "enable": False},                              # deny all
        {"quantizer_name": "*weight_quantizer", "cfg": <GranQ weight>, "enable": False},
        {"quantizer_name": "*input_quantizer", "cfg": <GranQ activation>, "enable": False},
        {"quantizer_name": "*weight_quantizer", "parent_class": "nn.Conv2d", "enable": True},
        {"quantizer_name": "*input_quantizer", "parent_class": "nn.Conv2d", "enable": True},
        ...                                             # placement "paper": one entry per module
     ],
     "algorithm": None}                                 # GranQ has nothing to calibrate

Every GranQ quantizer is configured (``"backend": "granq"``, ``"type": "dynamic"``, options in
``"backend_extra_args"``), then switched on where the placement says:

* weights: the weight quantizers of ``WEIGHT_LAYERS`` (Conv1d/2d/3d, Linear);
* activations, placement ``"all"``: the input quantizers of ``ACTIVATION_LAYERS`` (those and the
  pooling layers modelopt replaces: AvgPool, AdaptiveAvgPool, MaxPool); BatchNorm, LayerNorm,
  InstanceNorm, LeakyReLU, Embedding and RNN quantizers stay off;
* activations, placement ``"paper"``: only the input quantizers of those layers whose input is
  a ReLU/ReLU6 output, found by the data flow of one forward pass of ``model`` on
  ``example_inputs`` (:func:`granq_ao.relu.find_relu_fed_modules`); one exact-name entry each;
* activations, placement ``"inputs"``: the input quantizers of ``WEIGHT_LAYERS`` only (every
  conv/linear input; pooling inputs stay float). modelopt quantizes each layer's input inside
  the layer: a value read by two layers is fake-quantized by each (the same numbers, as GranQ's
  ranges come from the value itself).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

import torch

from granq_ao.config import GranQConfig, GranQScheme, reject_options_with
from granq_ao.relu import find_relu_fed_modules

from ._backend import BACKEND, backend_args

__all__ = ["granq_quant_cfg", "relu_fed_layers", "WEIGHT_LAYERS", "ACTIVATION_LAYERS"]

#: modelopt registry keys of the layers whose weight quantizer GranQ enables.
WEIGHT_LAYERS = ("nn.Conv1d", "nn.Conv2d", "nn.Conv3d", "nn.Linear")
#: ... and of those whose input quantizer it may enable (placement decides which).
ACTIVATION_LAYERS = WEIGHT_LAYERS + (
    "nn.AvgPool1d", "nn.AvgPool2d", "nn.AvgPool3d", "nn.AdaptiveAvgPool1d", "nn.AdaptiveAvgPool2d",
    "nn.AdaptiveAvgPool3d", "nn.MaxPool1d", "nn.MaxPool2d", "nn.MaxPool3d")


def _torch_class(key: str) -> type:
    """``torch.nn.Conv2d`` for the registry key ``"nn.Conv2d"``."""
    return getattr(torch.nn, key[len("nn."):])


def _quantizer_cfg(config: GranQConfig, role: str) -> Dict[str, Any]:
    """A modelopt ``QuantizerAttributeConfig`` dict selecting the GranQ backend for ``config``.
    ``num_bits`` is shown in modelopt's repr only; ``type: dynamic`` keeps calibration away."""
    return {"num_bits": config.bits, "axis": None, "type": "dynamic", "backend": BACKEND,
            "backend_extra_args": backend_args(config, role)}


def _literal(name: str) -> str:
    """An fnmatch pattern matching exactly ``name`` (``[``, ``*``, ``?`` escaped)."""
    return "".join(f"[{char}]" if char in "[]*?" else char for char in name)


def relu_fed_layers(model: torch.nn.Module, example_inputs: Any) -> List[str]:
    """Names of the ``ACTIVATION_LAYERS`` of ``model`` whose input is a ReLU/ReLU6 output (data
    flow of one forward pass; see :func:`granq_ao.relu.find_relu_fed_modules`). ``model`` may be
    float or already quantized (modelopt's quant layers subclass the torch.nn ones)."""
    classes = tuple(_torch_class(key) for key in ACTIVATION_LAYERS)
    candidates = {name: module for name, module in model.named_modules() if isinstance(module, classes)}
    return find_relu_fed_modules(model, example_inputs, candidates)


def _scheme(first: Union[int, GranQScheme, None], kwargs: Dict[str, Any]) -> GranQScheme:
    if isinstance(first, GranQScheme):
        reject_options_with(first, kwargs)
        return first
    if first is not None:
        kwargs["weight_bits"] = first
    return GranQScheme.from_kwargs(**kwargs)


def granq_quant_cfg(weight_bits: Union[int, GranQScheme, None] = None, *, model: Optional[torch.nn.Module] = None,
                    example_inputs: Any = None, **options: Any) -> Dict[str, Any]:
    """The ``mtq.quantize(model, cfg, forward_loop)`` config for GranQ (module docstring).

    Args:
        weight_bits: a :class:`~granq_ao.config.GranQScheme` (then no other options: ``ValueError``), or the
            weight bits of :meth:`GranQScheme.from_kwargs` (default 4).
        model, example_inputs: needed for ``act_placement="paper"`` (the forward pass that
            finds the ReLU-fed layers; ``example_inputs`` a tensor or a tuple of arguments);
            not used by ``"all"`` and ``"inputs"``.
        **options: the other keywords of :meth:`GranQScheme.from_kwargs` (``act_bits``,
            ``act_granularity``, ``weight_granularity``, ``act_placement``, ``symmetric_weights``,
            ``symmetric_acts``, ``fused``, ``check_finite``), validated there.

    No calibration is needed: ``mtq.quantize(model, cfg, forward_loop=None)``.
    """
    scheme = _scheme(weight_bits, options)
    entries: List[Dict[str, Any]] = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "cfg": _quantizer_cfg(scheme.weight, "weight"), "enable": False},
        {"quantizer_name": "*input_quantizer", "cfg": _quantizer_cfg(scheme.activation, "activation"),
         "enable": False},
    ]
    entries += [{"quantizer_name": "*weight_quantizer", "parent_class": key, "enable": True}
                for key in WEIGHT_LAYERS]
    if scheme.placement in ("all", "inputs"):
        layers = ACTIVATION_LAYERS if scheme.placement == "all" else WEIGHT_LAYERS
        entries += [{"quantizer_name": "*input_quantizer", "parent_class": key, "enable": True}
                    for key in layers]
    else:
        if model is None or example_inputs is None:
            raise ValueError('act_placement="paper" needs model= and example_inputs= to find the layers '
                             "whose input is a ReLU output (one forward pass)")
        entries += [{"quantizer_name": _literal(f"{name}.input_quantizer" if name else "input_quantizer"),
                     "enable": True} for name in relu_fed_layers(model, example_inputs)]
    return {"quant_cfg": entries, "algorithm": None}
