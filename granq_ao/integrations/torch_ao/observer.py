"""GranQObserver: running per-channel ranges for the *static* export of a GranQ model.

GranQ itself needs no observer: its ranges are recomputed from every sample. torch.ao still
requires one (``activation_post_process``) and a static export (``quantize_per_channel``) needs
fixed qparams, so this observer keeps, per channel ``c`` along ``ch_axis``,

    min_val[c] <- min_val[c] + a * (batch_min[c] - min_val[c])      (a = averaging_constant;
    max_val[c] <- max_val[c] + a * (batch_max[c] - max_val[c])       a = 1: last batch only)

starting from the first batch's ranges; and the same for one per-tensor range. Static qparams
(:meth:`calculate_qparams`) use the formula of ``granq_ao.functional.compute_qparams`` on the
ranges widened to include 0 (so every zero point lies on the integer grid, as
``torch.quantize_per_channel`` requires), with ``scale >= eps``.

``per_tensor=True`` keeps only the per-tensor range (for a per-tensor fake-quant): qscheme and
static qparams are then per tensor.

Shared instances: torch.ao FX reuses one observer for ops that share qparams with their input
(maxpool, flatten, view, ...), so one instance may see ``(N, C, H, W)`` and then
``(N, C*H*W)``. When it sees a channel count different from its running buffers it keeps the
per-channel buffers untouched and marks itself ``channel_mismatch``; its static qparams are
then per-tensor (``qscheme`` becomes ``per_tensor_affine``), which is valid for every shape.
"""
from __future__ import annotations

import copy
import functools
import pickle
from typing import Optional, Tuple

import torch
from torch.ao.quantization.observer import ObserverBase, _PartialWrapper

from granq_ao import functional as granq_functional

from .eager_guard import refuse_torch_convert


class PicklablePartial(_PartialWrapper):
    """torch.ao's ``with_args`` constructor (``_PartialWrapper``) that pickles.

    torch.ao's prepare wraps every constructor of a qconfig that accepts ``factory_kwargs``
    with ``with_callable_args(factory_kwargs=<local function>)`` and stores that qconfig on
    each prepared module (``module.qconfig``) and in the graph's meta: a local function cannot
    be pickled, so ``torch.save(prepared_model)`` failed ("Can't pickle local object
    ...get_factory_kwargs_based_on_module_device"; torch.ao's own constructors do the same).
    This wrapper pickles without the callable arguments that cannot be pickled. Only that
    ``factory_kwargs`` callable is concerned, and GranQ's fake-quant and observer build their
    buffers on the CPU whatever it says (FX moves them to the model's device), so a loaded
    qconfig builds the same modules. ``copy``/``deepcopy`` keep every callable argument.
    """

    def with_args(self, **kwargs) -> "PicklablePartial":
        return PicklablePartial(functools.partial(self, **kwargs))

    def with_callable_args(self, **kwargs) -> "PicklablePartial":
        result = PicklablePartial(self.p)
        result.callable_args = {**self.callable_args, **kwargs}
        return result

    def __copy__(self) -> "PicklablePartial":
        return self.with_callable_args()

    def __deepcopy__(self, memo) -> "PicklablePartial":
        result = PicklablePartial(copy.deepcopy(self.p, memo))
        memo[id(self)] = result
        result.callable_args = dict(self.callable_args)  # functions: copied by reference anyway
        return result

    def __reduce__(self):
        return _rebuild_partial, (self.p, {name: value for name, value in self.callable_args.items()
                                           if _picklable(value)})


def _rebuild_partial(p, callable_args) -> PicklablePartial:
    result = PicklablePartial(p)
    result.callable_args = dict(callable_args)
    return result


def _picklable(value) -> bool:
    try:
        pickle.dumps(value)
    except Exception:  # pickle raises AttributeError, TypeError, PicklingError, ... by object
        return False
    return True


def picklable_with_args(cls_or_self, **kwargs) -> PicklablePartial:
    """``cls.with_args(**kwargs)`` for GranQ's torch.ao classes: a :class:`PicklablePartial`."""
    return PicklablePartial(functools.partial(cls_or_self, **kwargs))


def picklable_with_callable_args(cls_or_self, **kwargs) -> PicklablePartial:
    """``cls.with_callable_args(**kwargs)`` for GranQ's torch.ao classes: a :class:`PicklablePartial`."""
    return PicklablePartial(cls_or_self).with_callable_args(**kwargs)


class GranQObserver(ObserverBase):
    r"""Vectorized running per-channel (and per-tensor) min/max for static GranQ export.

    Args:
        bits: integer grid width (2..8); ``quant_min``/``quant_max`` follow from it.
        ch_axis: channel axis of the observed tensors.
        symmetric: symmetric ranges (zero point 0 on the signed grid, ``2^(b-1)`` on the unsigned one).
        averaging_constant: moving-average weight ``a`` (torch.ao's QAT default is 0.01).
        dtype: ``torch.quint8`` (activations; grid ``[0, 2^b - 1]``) or ``torch.qint8``
            (weights; grid ``[-2^(b-1), 2^(b-1) - 1]``). Static zero points are given on that grid.
        eps: smallest static scale.
        per_tensor: keep only the per-tensor range; static qparams are per tensor.

    Attributes: ``min_val``/``max_val`` (per channel, empty until the first batch),
    ``min_val_tensor``/``max_val_tensor`` (per tensor), ``channel_mismatch``, ``quant_min``,
    ``quant_max``, ``eps``, ``ch_axis``, ``qscheme``.
    """

    min_val: torch.Tensor
    max_val: torch.Tensor

    with_args = classmethod(picklable_with_args)
    with_callable_args = classmethod(picklable_with_callable_args)

    def __init__(self, bits: int = 8, ch_axis: int = 1, symmetric: bool = False,
                 averaging_constant: float = 0.01, dtype: torch.dtype = torch.quint8,
                 quant_min: Optional[int] = None, quant_max: Optional[int] = None,
                 eps: float = torch.finfo(torch.float32).eps, is_dynamic: bool = False,
                 per_tensor: bool = False, **kwargs) -> None:
        if bits is None:
            bits = bits_from_quant_range(quant_min, quant_max)
        # The stored integer grid follows the dtype label: qint8 -> signed, quint8 -> unsigned
        # (torch's converters check quant_min/quant_max against the dtype's range).
        q_min, q_max = granq_functional.quant_range(bits, symmetric=dtype == torch.qint8)
        if (quant_min is not None or quant_max is not None) and (quant_min, quant_max) != (q_min, q_max):
            raise ValueError(
                f"quant_min/quant_max ({quant_min}, {quant_max}) do not match {bits} bits on the "
                f"{dtype} grid [{q_min}, {q_max}]"
            )
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        super().__init__(dtype=dtype, is_dynamic=False)
        self.bits = bits
        self.ch_axis = ch_axis
        self.symmetric = symmetric
        self.averaging_constant = averaging_constant
        self.per_tensor = per_tensor
        self.quant_min, self.quant_max = q_min, q_max
        self.register_buffer("eps", torch.tensor([eps]))
        self.register_buffer("min_val", torch.tensor([]))
        self.register_buffer("max_val", torch.tensor([]))
        self.register_buffer("min_val_tensor", torch.tensor(float("inf")))
        self.register_buffer("max_val_tensor", torch.tensor(float("-inf")))
        self.register_buffer("_channel_mismatch", torch.tensor(False))

    # -- what torch.ao reads
    @property
    def channel_mismatch(self) -> bool:
        return bool(self._channel_mismatch)

    @property
    def per_channel(self) -> bool:
        return not (self.per_tensor or self.channel_mismatch)

    @property
    def qscheme(self) -> torch.qscheme:
        if self.per_channel:
            return torch.per_channel_symmetric if self.symmetric else torch.per_channel_affine
        return torch.per_tensor_symmetric if self.symmetric else torch.per_tensor_affine

    @qscheme.setter
    def qscheme(self, value) -> None:  # ObserverBase/with_args may assign it; it is derived here
        pass

    @property
    def has_data(self) -> bool:
        """Whether a (non-empty) batch was recorded: static qparams exist only then."""
        return not bool(torch.isinf(self.min_val_tensor))

    # -- recording
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Record ``x``'s per-channel and per-tensor ranges; return ``x`` unchanged."""
        if x.numel() == 0:
            return x
        if self.per_tensor or x.dim() < 2:
            self._record_tensor(x.detach().amin(), x.detach().amax())
            if not self.per_tensor:
                self._channel_mismatch.fill_(True)
            return x
        batch_min, batch_max = granq_functional.reduce_min_max(x.detach(), "channel", axis=self.ch_axis)
        self.record_channel_ranges(batch_min.flatten(), batch_max.flatten())
        return x

    @torch.no_grad()
    def record_ranges(self, x_min: torch.Tensor, x_max: torch.Tensor) -> None:
        """Record ranges already reduced from a batch (e.g. GranQ's per-(n, c) ranges, keepdim,
        channel on ``ch_axis``; any shape when ``per_tensor``): reduced further to per channel,
        without touching the input."""
        if self.per_tensor:
            self._record_tensor(x_min.amin(), x_max.amax())
            return
        dims = [d for d in range(x_min.dim()) if d != self.ch_axis % x_min.dim()]
        self.record_channel_ranges(x_min.amin(dim=dims).flatten(), x_max.amax(dim=dims).flatten())

    @torch.no_grad()
    def record_channel_ranges(self, channel_min: torch.Tensor, channel_max: torch.Tensor) -> None:
        # in the buffers' dtype: float32, or whatever model.double()/.half()/.bfloat16() made them
        channel_min, channel_max = channel_min.to(self.min_val.dtype), channel_max.to(self.max_val.dtype)
        self._record_tensor(channel_min.min(), channel_max.max())
        if self.min_val.numel() == 0:
            self.min_val.resize_(channel_min.shape).copy_(channel_min)
            self.max_val.resize_(channel_max.shape).copy_(channel_max)
        elif self.min_val.shape != channel_min.shape:
            self._channel_mismatch.fill_(True)
        else:  # lerp_: min_val + a * (channel_min - min_val), one op per buffer
            self.min_val.lerp_(channel_min, self.averaging_constant)
            self.max_val.lerp_(channel_max, self.averaging_constant)

    def _record_tensor(self, tensor_min: torch.Tensor, tensor_max: torch.Tensor) -> None:
        # Branch-free (no host sync on GPU): the first batch (running range still +-inf) is taken
        # as is, later ones are averaged in (lerp of an infinite start is NaN; where() drops it).
        tensor_min = tensor_min.to(self.min_val_tensor.dtype)
        tensor_max = tensor_max.to(self.max_val_tensor.dtype)
        first = torch.isinf(self.min_val_tensor)
        a = self.averaging_constant
        self.min_val_tensor.copy_(torch.where(first, tensor_min, self.min_val_tensor.lerp(tensor_min, a)))
        self.max_val_tensor.copy_(torch.where(first, tensor_max, self.max_val_tensor.lerp(tensor_max, a)))

    # -- static qparams
    @torch.jit.export
    def calculate_qparams(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Static ``(scale float32, zero_point int64)``: per channel, or per tensor after a
        channel mismatch. Ranges include 0; ``scale >= eps``. Before any batch: scale 1, zp 0.
        Refused inside torch.ao's eager ``convert`` (see :mod:`.eager_guard`)."""
        refuse_torch_convert()
        if self.per_channel:
            x_min, x_max = self.min_val, self.max_val
            if x_min.numel() == 0:
                return torch.ones(1), torch.zeros(1, dtype=torch.int64)
        else:
            x_min, x_max = self.min_val_tensor, self.max_val_tensor
            if torch.isinf(x_min):
                return torch.tensor(1.0), torch.tensor(0, dtype=torch.int64)
        x_min = torch.clamp(x_min, max=0.0)
        x_max = torch.clamp(x_max, min=0.0)
        scale, zero_point = granq_functional.compute_qparams(x_min, x_max, self.bits, self.symmetric)
        # compute_qparams' grid is [0, 2^b - 1] (asymmetric) or signed (symmetric); shifting
        # the zero point onto the stored grid gives the same dequantized values.
        zero_point = zero_point + (self.quant_min - granq_functional.quant_range(self.bits, self.symmetric)[0])
        scale = torch.maximum(scale, self.eps.to(scale.device))
        return scale, zero_point.to(torch.int64)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, ch_axis={self.ch_axis}, symmetric={self.symmetric}, "
                f"averaging_constant={self.averaging_constant}, "
                + ("per_tensor=True" if self.per_tensor else
                   f"channels={self.min_val.numel()}, channel_mismatch={self.channel_mismatch}"))

    def __setstate__(self, state) -> None:
        # torch.load gives tensors whose storage cannot be resized; the per-channel buffers are
        # resized in place by the first batch (record_channel_ranges): give them their own storage.
        super().__setstate__(state)
        for name in ("min_val", "max_val"):
            buffer = self._buffers.get(name)
            if buffer is not None and not buffer.untyped_storage().resizable():
                self._buffers[name] = buffer.clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        # Per-channel buffers start empty: take the saved size before torch copies into them.
        for name in ("min_val", "max_val"):
            key = prefix + name
            current = getattr(self, name)
            if key in state_dict and current.shape != state_dict[key].shape:
                # a new tensor, not resize_: a loaded buffer's storage may not be resizable
                self._buffers[name] = current.new_empty(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)


def bits_from_quant_range(quant_min: Optional[int], quant_max: Optional[int]) -> int:
    """``bits`` from a torch.ao-style ``(quant_min, quant_max)`` pair, e.g. (0, 7) -> 3."""
    if quant_min is None or quant_max is None:
        raise ValueError("give bits, or both quant_min and quant_max")
    levels = quant_max - quant_min + 1
    bits = levels.bit_length() - 1
    if levels != 2**bits:
        raise ValueError(f"quant range [{quant_min}, {quant_max}] is not 2^bits levels wide")
    return bits
