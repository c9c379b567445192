"""The granularities a quantization range can have, as frozen dataclasses.

A granularity says which dimensions of a tensor keep their own range; the range (min, max)
is reduced over every other dimension:

=============  ======================  =========================================
name           class                   one range per
=============  ======================  =========================================
``"tensor"``   ``PerTensor()``         tensor (the whole batch)
``"channel"``  ``PerChannel(axis)``    channel ``axis`` (over the batch and space)
``"granq"``    ``PerSampleChannel()``  (sample, channel) pair: GranQ
=============  ======================  =========================================

For rank-2 inputs ``(N, F)``, ``PerSampleChannel`` keeps one range per sample (reduced over
``F``), as the official GranQ code does. On a weight ``(out, in, *k)``,
``PerSampleChannel(axis=1, batch_axis=0)`` is one range per (out, in) kernel slice (the official
code's weight ranges, called ``kernel`` in :mod:`granq_ao.config`). Names are resolved by
:func:`granq_ao.config.as_granularity`; how the ranges are computed (vectorized or the paper's
Python loop) is an option of :class:`granq_ao.config.GranQConfig`, not a granularity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple, Union


@dataclass(frozen=True)
class PerTensor:
    """One range for the whole tensor."""

    name = "tensor"

    def kept_dims(self, ndim: int) -> Tuple[int, ...]:
        return ()


@dataclass(frozen=True)
class PerChannel:
    """One range per index of ``axis`` (reduced over every other dim, batch included)."""

    axis: int = 1
    name = "channel"

    def kept_dims(self, ndim: int) -> Tuple[int, ...]:
        return (_normalize_axis(self.axis, ndim),)


@dataclass(frozen=True)
class PerSampleChannel:
    """One range per (sample, channel): GranQ. Batch is dim ``batch_axis``, channels ``axis``."""

    axis: int = 1
    batch_axis: int = 0
    name = "granq"

    def kept_dims(self, ndim: int) -> Tuple[int, ...]:
        batch = _normalize_axis(self.batch_axis, ndim)
        channel = _normalize_axis(self.axis, ndim)  # validated for rank 2 too
        if ndim == 2:
            return (batch,)  # (N, F): one range per sample, as the official code does
        if channel == batch:
            raise ValueError(
                f"granq needs a channel axis different from the batch axis; got axis={self.axis} "
                f"and batch_axis={self.batch_axis} for a rank-{ndim} input"
            )
        return tuple(sorted((batch, channel)))


Granularity = Union[PerTensor, PerChannel, PerSampleChannel]


def _normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"channel axis {axis} is out of range for a rank-{ndim} input")
    return axis % ndim

