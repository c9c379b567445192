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

Hot path: one min/max reduction of ``x`` (reused by the observer whenever its channel axis is a
kept dim of the granularity, or it is per tensor), one fused elementwise pass, and one host
read of a finiteness flag computed with the ranges (inside a user's ``torch.compile`` region a
device-side assert instead, so a compiled QAT model stays one graph). The enable flags are
mirrored in Python so ``forward`` never reads a device tensor for them: toggle them with ``enable_fake_quant`` /
``disable_fake_quant`` / ``enable_observer`` / ``disable_observer`` (or torch.ao's
``enable_fake_quant`` etc. through ``model.apply``) or ``load_state_dict``; writing into the
``fake_quant_enabled`` / ``observer_enabled`` buffers by hand is not seen by ``forward``.

Bad input: integer tensors raise ``TypeError``; NaN/inf raise
:class:`~granq_ao.functional.NonFiniteInputError`, a bad rank or channel axis ``ValueError``;
each message names this module (its qualified name in the model that called it). An empty
tensor is returned as is; constant slices pass through exactly (see ``granq_ao.functional``).

State: the enable flags, the observer's running ranges, and (as extra state) the settings that
shape the numbers: ``[bits, symmetric, granularity, axis, quant_min, quant_max]``.
``load_state_dict`` reports a fake-quant whose saved settings differ from its own (a 4-bit
checkpoint into an 8-bit model); state_dicts saved without them load as before.

Attributes read by torch.ao FX: ``activation_post_process``, ``dtype``, ``qscheme``,
``ch_axis``, ``is_dynamic`` (False: torch.ao's "dynamic" means something else),
``quant_min``, ``quant_max``, ``eps`` (on the observer).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch.ao.quantization.fake_quantize import FakeQuantizeBase

from granq_ao import functional as granq_functional
from granq_ao.config import GranQConfig, keyword_defaults, reject_options_with
from granq_ao.functional import NonFiniteInputError, fused_backend
from granq_ao.granularity import Granularity, PerTensor
from granq_ao.quantizer_state import EnableFlagsMixin, config_property

from .dynamic_qdq import insert_dynamic_quant_dequant, record_converted_source
from .eager_guard import refuse_torch_convert
from .zero_gamma import unrouted_zero_gamma_note
from .observer import GranQObserver, bits_from_quant_range, picklable_with_args, picklable_with_callable_args


class GranQFakeQuantize(EnableFlagsMixin, FakeQuantizeBase):
    r"""Dynamic fake-quantization with per-(sample, channel) ranges (or another granularity).

    Args:
        observer: observer class for the static-export ranges (default :class:`GranQObserver`).
        bits: 2..8 (or give torch.ao-style ``quant_min``/``quant_max``).
        granularity: ``"granq"`` (default) | ``"channel"`` | ``"tensor"`` | ``"granq_iterative"``
            or a granularity object. On a conv weight, ``"channel"`` with ``ch_axis=0`` is per
            output channel and ``"granq"`` is per (out, in) kernel slice (the official code).
        ch_axis: channel axis (1 for activations, 0 for weights).
        symmetric: symmetric grid (zero point 0) instead of the paper's asymmetric one.
        fused: ``"auto"``, ``"compiled"`` or ``"eager"`` (same numbers; ``None``/``True``/``False`` too).
        check_finite: refuse NaN/inf input (default). ``False`` skips the check and its one
            host read per call (on a GPU, a sync); NaN/inf then propagate (a slice whose range
            is NaN passes through unquantized, one with an infinite range becomes NaN).
        dtype: ``torch.quint8`` (activations; unsigned grid) or ``torch.qint8`` (weights; signed
            grid), the label torch.ao's backend checks. Default: ``qint8`` when ``quant_min < 0``
            is given, else ``quint8``.
        config: a :class:`~granq_ao.config.GranQConfig` giving bits, granularity, ch_axis,
            symmetric, fused and check_finite at once (giving one of those arguments too is a
            ``ValueError``).
        observer_kwargs: passed to ``observer`` (e.g. ``averaging_constant``).

    ``config`` holds the validated options; ``bits``, ``granularity``, ``symmetric``, ``fused``
    and ``check_finite`` read it.

    Example::

        >>> fq = GranQFakeQuantize.with_args(bits=3)()
        >>> fq = GranQFakeQuantize(config=GranQConfig.for_activation(3, "granq"))
        >>> y = fq(torch.randn(8, 16, 32, 32))
    """

    # torch.ao's constructors, but picklable: a prepared model holds them (see PicklablePartial)
    with_args = classmethod(picklable_with_args)
    with_callable_args = classmethod(picklable_with_callable_args)

    def __init__(self, observer=GranQObserver, bits: Optional[int] = None,
                 granularity: Union[str, Granularity] = "granq", ch_axis: int = 1,
                 symmetric: bool = False, fused="auto",
                 quant_min: Optional[int] = None, quant_max: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None, check_finite: bool = True,
                 config: Optional[GranQConfig] = None, **observer_kwargs) -> None:
        super().__init__()
        if config is None:
            if bits is None:
                bits = bits_from_quant_range(quant_min, quant_max) if quant_min is not None else 8
            config = GranQConfig(bits=bits, granularity=granularity, axis=ch_axis, symmetric=symmetric,
                                 fused=fused, check_finite=check_finite)
        elif not isinstance(config, GranQConfig):
            raise TypeError(f"config must be a GranQConfig, got {config!r}")
        else:
            reject_options_with(config, dict(bits=bits, granularity=granularity, ch_axis=ch_axis, symmetric=symmetric,
                                             fused=fused, check_finite=check_finite),
                                keyword_defaults(GranQFakeQuantize.__init__))
        if dtype is None:  # a signed torch.ao-style range implies the signed label
            dtype = torch.qint8 if quant_min is not None and quant_min < 0 else torch.quint8
        self.config = config
        self.ch_axis = config.axis
        self.dtype = dtype
        self.is_dynamic = False
        if isinstance(observer, type) and issubclass(observer, GranQObserver):
            observer_kwargs.setdefault("per_tensor", isinstance(config.granularity, PerTensor))
        self.activation_post_process = observer(bits=config.bits, ch_axis=config.axis, symmetric=config.symmetric,
                                                dtype=dtype, quant_min=quant_min, quant_max=quant_max,
                                                **observer_kwargs)
        self._init_enable_flags()  # Python mirrors of the enable buffers (granq_ao.quantizer_state)
        # shared quantizer (see .shared): the qparams of the latest call, kept for the calls
        # that reuse them (GranQSharedFakeQuantize) when ``records_qparams`` is set
        self.records_qparams = False
        self.last_qparams = None
        self.quant_min = self.activation_post_process.quant_min
        self.quant_max = self.activation_post_process.quant_max

    # -- the options, read from the config (replace ``config`` to change them)
    bits = config_property("bits")
    granularity = config_property("granularity")
    symmetric = config_property("symmetric")
    fused = config_property("fused")
    check_finite = config_property("check_finite")

    @property
    def qscheme(self) -> torch.qscheme:
        if isinstance(self.granularity, PerTensor) or self.activation_post_process.qscheme is None:
            return torch.per_tensor_symmetric if self.symmetric else torch.per_tensor_affine
        return self.activation_post_process.qscheme

    # enable flags, saved settings (extra state, checked on load), labelled errors:
    # granq_ao.quantizer_state.EnableFlagsMixin

    def _observer_reuses_ranges(self, ndim: int) -> bool:
        """Whether the observer's per-channel (or per-tensor) ranges follow from the ranges that
        the fake-quant reduced anyway (no second pass over ``x``)."""
        observer = self.activation_post_process
        if not isinstance(observer, GranQObserver):
            return False
        if observer.per_tensor:
            return True
        return ndim >= 1 and self.ch_axis % ndim in self.granularity.kept_dims(ndim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        observe = self._observer_on
        quantize = self._fake_quant_on
        if self.records_qparams:  # a shared quantizer's owner: no stale qparams if this call computes none
            self.last_qparams = None
        if not (observe or quantize):
            return x
        try:
            x_detached = x.detach()
            # Validation, ranges (and fake-quant) in one call; NaN/inf refused there, before the
            # observer records anything.
            if quantize:
                x_hat, x_min, x_max = granq_functional.fake_quantize_dynamic(x, self.config)
            else:
                x_hat = x
                x_min, x_max = granq_functional.reduce_min_max(x_detached, self.granularity,
                                                               check_finite=self.check_finite,
                                                               iterative=self.config.iterative)
            if x.numel() == 0:
                return x
            if quantize and self.records_qparams:
                self.last_qparams = granq_functional.compute_qparams(x_min, x_max, self.bits, self.symmetric)
            if observe:
                if self._observer_reuses_ranges(x.dim()):
                    self.activation_post_process.record_ranges(x_min, x_max)
                else:  # e.g. (N, F) input: per-sample ranges, per-feature observer
                    self.activation_post_process(x_detached)
            return x_hat
        except NonFiniteInputError as error:  # the likely cause: a zero BN weight in torch.ao's dividing conv-BN
            raise self.labelled(NonFiniteInputError(f"{error}{unrouted_zero_gamma_note(self)}")) from None
        except (ValueError, TypeError) as error:
            raise self.labelled(error) from None

    @torch.jit.export
    def calculate_qparams(self):
        """Static ``(scale, zero_point)`` from the observer's running ranges (for export).
        Refused inside torch.ao's eager ``convert`` (see :mod:`.eager_guard`)."""
        refuse_torch_convert()
        return self.activation_post_process.calculate_qparams()

    def convert(self, model: torch.fx.GraphModule, node: torch.fx.Node) -> None:
        """torch.ao's conversion hook (called by its decomposed converter): replace this
        module's call ``node`` by dynamic quantize/dequantize nodes that give the fake-quant's
        numbers (see :func:`~granq_ao.integrations.torch_ao.dynamic_qdq.insert_dynamic_quant_dequant`)."""
        record_converted_source(self, node)
        insert_dynamic_quant_dequant(model, node, self)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["last_qparams"] = None  # a run-time value, not state
        return state

    def __setstate__(self, state):
        state.setdefault("records_qparams", False)
        state.setdefault("last_qparams", None)
        super().__setstate__(state)

    def extra_repr(self) -> str:
        granularity = self.config.name
        axis = getattr(self.granularity, "axis", self.ch_axis)
        if axis != self.ch_axis and granularity != "kernel":
            granularity += f"(axis={axis})"
        return (f"bits={self.bits}, granularity={granularity}, ch_axis={self.ch_axis}, "
                f"symmetric={self.symmetric}, fake_quant_enabled={self._fake_quant_on}, "
                f"observer_enabled={self._observer_on}, backend={fused_backend(self.fused)}"
                + ("" if self.check_finite else ", check_finite=False"))
