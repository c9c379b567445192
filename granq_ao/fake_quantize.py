"""GranQFakeQuantize: GranQ's dynamic fake-quantization as a torch.ao ``FakeQuantizeBase``.

Output, for ``b`` bits and the ranges of the chosen granularity reduced from ``x`` itself
(GranQ: one range per (sample n, channel c), recomputed at train AND eval time)::

    s = (x_max - x_min) / (2^b - 1),  z = round(-x_min / s)
    x_out = (clamp(round(x / s + z), 0, 2^b - 1) - z) * s      if fake_quant_enabled
    x_out = x                                                    otherwise

Gradient: straight-through (``dx = dx_out``). The math is ``granq_ao.functional``.

The attached ``activation_post_process`` (a :class:`~granq_ao.observer.GranQObserver`) keeps
running per-channel ranges while ``observer_enabled``; they only serve the *static* export
(:meth:`calculate_qparams`), never the fake-quant itself. For GranQ granularity the observer
reuses the per-(n, c) ranges already reduced, so observing costs no extra pass over ``x``.

Attributes read by torch.ao FX: ``activation_post_process``, ``dtype``, ``qscheme``,
``ch_axis``, ``is_dynamic`` (False: torch.ao's "dynamic" means something else),
``quant_min``, ``quant_max``, ``eps`` (on the observer).
"""
from __future__ import annotations

import sys
from typing import Optional, Union

import torch
from torch.ao.quantization.fake_quantize import FakeQuantizeBase

from . import functional as F
from .granularity import Granularity, PerSampleChannel, as_granularity
from .observer import GranQObserver, bits_from_quant_range


class GranQFakeQuantize(FakeQuantizeBase):
    r"""Dynamic fake-quantization with per-(sample, channel) ranges (or another granularity).

    Args:
        observer: observer class for the static-export ranges (default :class:`GranQObserver`).
        bits: 2..8 (or give torch.ao-style ``quant_min``/``quant_max``).
        granularity: ``"granq"`` (default) | ``"channel"`` | ``"tensor"`` | ``"granq_iterative"``
            or a granularity object. On a conv weight, ``"channel"`` with ``ch_axis=0`` is per
            output channel and ``"granq"`` is per (out, in) kernel slice (the official code).
        ch_axis: channel axis (1 for activations, 0 for weights).
        symmetric: symmetric grid (zero point 0) instead of the paper's asymmetric one.
        fused: ``None`` auto, ``True`` torch.compile'd, ``False`` eager (same numbers).
        dtype: label for torch.ao's backend checks; default ``quint8`` (activations). Use
            ``torch.qint8`` for weights.
        observer_kwargs: passed to ``observer`` (e.g. ``averaging_constant``).

    Example::

        >>> fq = GranQFakeQuantize.with_args(bits=3)()
        >>> y = fq(torch.randn(8, 16, 32, 32))
    """

    def __init__(self, observer=GranQObserver, bits: Optional[int] = None,
                 granularity: Union[str, Granularity] = "granq", ch_axis: int = 1,
                 symmetric: bool = False, fused: Optional[bool] = None,
                 quant_min: Optional[int] = None, quant_max: Optional[int] = None,
                 dtype: torch.dtype = torch.quint8, **observer_kwargs) -> None:
        super().__init__()
        if bits is None:
            bits = bits_from_quant_range(quant_min, quant_max) if quant_min is not None else 8
        if quant_min is not None and quant_min < 0:
            symmetric = True
        F.quant_range(bits, symmetric)  # validates bits
        self.bits = bits
        self.symmetric = symmetric
        self.granularity = as_granularity(granularity, ch_axis)
        self.ch_axis = ch_axis
        self.fused = fused
        self.dtype = dtype
        self.is_dynamic = False
        self.activation_post_process = observer(bits=bits, ch_axis=ch_axis, symmetric=symmetric,
                                                dtype=dtype, **observer_kwargs)
        self.quant_min = self.activation_post_process.quant_min
        self.quant_max = self.activation_post_process.quant_max

    @property
    def qscheme(self) -> torch.qscheme:
        if self.granularity.name == "tensor":
            return torch.per_tensor_symmetric if self.symmetric else torch.per_tensor_affine
        return self.activation_post_process.qscheme

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        observe = bool(self.observer_enabled[0])
        quantize = bool(self.fake_quant_enabled[0])
        if not (observe or quantize) or x.numel() == 0:
            return x
        if not x.is_floating_point():
            raise TypeError(f"{self._where()}: GranQ quantizes floating-point tensors, got {x.dtype}")
        try:
            x_min, x_max = F.reduce_min_max(x.detach(), self.granularity)
            if observe:
                if isinstance(self.granularity, PerSampleChannel) and x.dim() > 2 \
                        and self.granularity.axis % x.dim() == self.ch_axis % x.dim():
                    self.activation_post_process.record_ranges(x_min, x_max)
                else:
                    self.activation_post_process(x.detach())
            if not quantize:
                return x
            return F.fake_quantize_from_ranges(x, x_min, x_max, self.bits, self.symmetric, self.fused)
        except F.NonFiniteInputError as error:
            raise F.NonFiniteInputError(f"{self._where()}: {error}") from None
        except ValueError as error:
            raise ValueError(f"{self._where()}: {error}") from None

    @torch.jit.export
    def calculate_qparams(self):
        """Static ``(scale, zero_point)`` from the observer's running ranges (for export)."""
        return self.activation_post_process.calculate_qparams()

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, granularity={self.granularity.name}, ch_axis={self.ch_axis}, "
                f"symmetric={self.symmetric}, fake_quant_enabled={bool(self.fake_quant_enabled[0])}, "
                f"observer_enabled={bool(self.observer_enabled[0])}, backend={F.fused_backend(self.fused)}")

    def _where(self) -> str:
        """This module's qualified name in the model that called it (found only on error)."""
        frame = sys._getframe(1)
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, torch.nn.Module) and owner is not self:
                for name, module in owner.named_modules():
                    if module is self:
                        return f"{type(self).__name__} '{name}' (in {type(owner).__name__})"
            frame = frame.f_back
        return type(self).__name__
