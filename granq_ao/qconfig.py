"""QConfigs and QConfigMappings for torch.ao FX QAT, named and shaped like torch.ao's.

``get_granq_qconfig`` mirrors ``torch.ao.quantization.get_default_qat_qconfig``;
``get_granq_qat_qconfig_mapping`` mirrors ``get_default_qat_qconfig_mapping``: the same
special cases (fixed-qparams ops, ``reshape``, transposed convs, LayerNorm), GranQ everywhere
else::

    qmap = get_granq_qat_qconfig_mapping(weight_bits=3, act_bits=3)
    qat = torch.ao.quantization.quantize_fx.prepare_qat_fx(model.train(), qmap, example_inputs)

Activations: :class:`GranQFakeQuantize` (``act_granularity``: granq | channel | tensor |
granq_iterative), ``quint8`` label. Weights: the same module with ``ch_axis=0`` and
``weight_granularity``: ``channel`` (per output channel, default), ``kernel`` (per (out, in)
kernel slice: the official GranQ code's ranges), ``tensor``; ``qint8`` label, asymmetric
min/max like the official code unless ``symmetric_weights``.

``act_placement="paper"`` marks the mapping so that :func:`granq_ao.prepare_qat_fx` keeps
activation fake-quants only on ReLU/ReLU6 outputs (see ``granq_ao.placement``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.ao.quantization import QConfig, QConfigMapping, get_default_qat_qconfig_mapping
from torch.ao.quantization.fake_quantize import FixedQParamsFakeQuantize
from torch.ao.quantization.observer import ReuseInputObserver

from .fake_quantize import GranQFakeQuantize
from .granularity import GRANULARITY_NAMES, PerChannel, PerSampleChannel, PerTensor

WEIGHT_GRANULARITIES = ("channel", "kernel", "tensor")
ACT_PLACEMENTS = ("all", "paper")

# weight granularity name -> GranQFakeQuantize granularity on a weight (out, in, *kernel); the
# weight fake-quant's ch_axis (its observer's, for static export) is 0 in every case.
_WEIGHT_GRANULARITY = {
    "channel": PerChannel(axis=0),                    # one range per output channel
    "kernel": PerSampleChannel(axis=1, batch_axis=0),  # one per (out, in) slice; per row if 2-D
    "tensor": PerTensor(),
}


class GranQQConfigMapping(QConfigMapping):
    """A ``QConfigMapping`` that also carries where activations are quantized
    (``act_placement``: ``"all"`` as torch.ao does, or ``"paper"``: after ReLU/ReLU6 only)."""

    def __init__(self, act_placement: str = "all") -> None:
        super().__init__()
        if act_placement not in ACT_PLACEMENTS:
            raise ValueError(f"act_placement must be one of {ACT_PLACEMENTS}, got {act_placement!r}")
        self.act_placement = act_placement


def get_granq_qconfig(weight_bits: int = 4, act_bits: int = 4, act_granularity: str = "granq",
                      weight_granularity: str = "channel", symmetric_weights: bool = False,
                      symmetric_acts: bool = False, fused: Optional[bool] = None,
                      averaging_constant: float = 0.01, check_finite: bool = True) -> QConfig:
    """A QAT ``QConfig``: GranQ fake-quant for activations and weights (see module doc).
    ``check_finite=False`` drops the per-call NaN/inf check (and its host read: a sync on GPU)."""
    if act_granularity not in GRANULARITY_NAMES:
        raise ValueError(f"act_granularity must be one of {GRANULARITY_NAMES}, got {act_granularity!r}")
    if weight_granularity not in WEIGHT_GRANULARITIES:
        raise ValueError(
            f"weight_granularity must be one of {WEIGHT_GRANULARITIES}, got {weight_granularity!r}"
        )
    activation = GranQFakeQuantize.with_args(
        bits=act_bits, granularity=act_granularity, ch_axis=1, symmetric=symmetric_acts,
        fused=fused, dtype=torch.quint8, averaging_constant=averaging_constant,
        check_finite=check_finite,
    )
    weight = GranQFakeQuantize.with_args(
        bits=weight_bits, granularity=_WEIGHT_GRANULARITY[weight_granularity], ch_axis=0,
        symmetric=symmetric_weights, fused=fused, dtype=torch.qint8, averaging_constant=1.0,
        check_finite=check_finite,
    )
    # Validate now (bits, ...) rather than deep inside prepare_qat_fx.
    activation()
    weight()
    return QConfig(activation=activation, weight=weight)


def _keeps_torch_activation(qconfig: QConfig) -> bool:
    """Fixed-qparams ops (sigmoid, tanh, softmax, ...) and ``reshape`` (reuses its input's
    observer) keep torch.ao's activation: their output range is not data dependent."""
    target = qconfig.activation
    # unwrap torch.ao's with_args (_PartialWrapper: .p) and functools.partial (.func)
    while not isinstance(target, type) and (hasattr(target, "p") or hasattr(target, "func")):
        target = getattr(target, "p", None) or target.func
    return isinstance(target, type) and issubclass(target, (FixedQParamsFakeQuantize, ReuseInputObserver))


def get_granq_qat_qconfig_mapping(weight_bits: int = 4, act_bits: int = 4,
                                  act_granularity: str = "granq", weight_granularity: str = "channel",
                                  act_placement: str = "all", backend: str = "x86",
                                  symmetric_weights: bool = False, symmetric_acts: bool = False,
                                  fused: Optional[bool] = None, check_finite: bool = True
                                  ) -> GranQQConfigMapping:
    """torch.ao's default QAT mapping for ``backend`` with GranQ in place of its default qconfig.

    Ops with fixed output ranges (sigmoid, tanh, softmax, ...) and ``reshape`` keep torch.ao's
    qconfigs. Transposed convolutions get per-tensor weight ranges (their weight's output
    channels are on dim 1). ``act_placement="paper"``: see :class:`GranQQConfigMapping`.
    """
    qconfig = get_granq_qconfig(weight_bits, act_bits, act_granularity, weight_granularity,
                                symmetric_weights, symmetric_acts, fused, check_finite=check_finite)
    transpose_qconfig = get_granq_qconfig(weight_bits, act_bits, act_granularity, "tensor",
                                          symmetric_weights, symmetric_acts, fused,
                                          check_finite=check_finite)
    torch_default = get_default_qat_qconfig_mapping(backend)
    mapping = GranQQConfigMapping(act_placement)
    mapping.set_global(qconfig)
    transposed = {torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d,
                  torch.nn.functional.conv_transpose1d, torch.nn.functional.conv_transpose2d,
                  torch.nn.functional.conv_transpose3d}
    for object_type, object_qconfig in torch_default.object_type_qconfigs.items():
        if object_type in transposed:
            mapping.set_object_type(object_type, transpose_qconfig)
        elif object_qconfig is None or _keeps_torch_activation(object_qconfig):
            mapping.set_object_type(object_type, object_qconfig)
        else:  # LayerNorm, PReLU: torch.ao's special weight handling, GranQ activation
            mapping.set_object_type(object_type, QConfig(activation=qconfig.activation,
                                                         weight=object_qconfig.weight))
    return mapping
