"""torchao ``QuantizationSpec`` s for GranQ configs.

A spec is what a PT2E quantizer writes into a node's annotation; prepare builds the fake-quant
from it. For a :class:`~granq_ao.config.GranQConfig` ``config``:

=============  ==================================================================================
``dtype``      ``torch.uint8`` on the asymmetric grid ``[0, 2^b - 1]``, ``torch.int8`` on the
               symmetric one ``[-2^(b-1), 2^(b-1) - 1]`` (``config.quant_min``/``quant_max``)
``qscheme``    ``per_tensor_*`` for ``tensor`` ranges, else ``per_channel_*`` (``affine`` or
               ``symmetric``); ``ch_axis`` = ``config.axis`` (1 for activations, 0 for weights)
``is_dynamic`` False, although GranQ's ranges come from each input: torchao's "dynamic" means its
               own per-tensor ``choose_qparams`` ops, which its convert passes then look for;
               GranQ's fake-quant converts itself (``GranQPT2EFakeQuantize.convert``)
``ctr``        :class:`GranQPT2EFakeQuantize` ``.with_args(config=config)``
=============  ==================================================================================

Two specs with the same dtype, grid, qscheme and axis on one tensor share one fake-quant
(torchao's implicit sharing), so a value is never fake-quantized twice.
"""
from __future__ import annotations

import torch
from torchao.quantization.pt2e.quantizer import QuantizationSpec

from granq_ao.config import GranQConfig
from granq_ao.granularity import PerTensor

from .fake_quantize import GranQPT2EFakeQuantize

__all__ = ["granq_spec"]


def _qscheme(config: GranQConfig) -> torch.qscheme:
    if isinstance(config.granularity, PerTensor):
        return torch.per_tensor_symmetric if config.symmetric else torch.per_tensor_affine
    return torch.per_channel_symmetric if config.symmetric else torch.per_channel_affine


def granq_spec(config: GranQConfig, **fake_quant_options) -> QuantizationSpec:
    """The ``QuantizationSpec`` of a GranQ fake-quant for ``config`` (module docstring);
    ``fake_quant_options`` go to :class:`GranQPT2EFakeQuantize` (``fold_bn=True``)."""
    per_tensor = isinstance(config.granularity, PerTensor)
    return QuantizationSpec(
        dtype=torch.int8 if config.symmetric else torch.uint8,
        observer_or_fake_quant_ctr=GranQPT2EFakeQuantize.with_args(config=config, **fake_quant_options),
        quant_min=config.quant_min,
        quant_max=config.quant_max,
        qscheme=_qscheme(config),
        ch_axis=None if per_tensor or config.axis < 0 else config.axis,
        is_dynamic=False,
    )
