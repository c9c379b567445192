"""GranQDescriptor and GranQTensorQuantizer: GranQ inside NVIDIA pytorch-quantization.

``GranQTensorQuantizer`` is a ``pytorch_quantization.nn.TensorQuantizer`` whose quantizing
forward is :func:`granq_ao.functional.fake_quantize` (dynamic, asymmetric, per (sample,
channel) by default)::

    x_min, x_max = min / max of x over every dim but (batch, channel)    (from x itself)
    s = (x_max - x_min) / (2^b - 1),   z = round(-x_min / s)
    x_hat = (clamp(round(x / s + z), 0, 2^b - 1) - z) * s
    dL/dx = dL/dx_hat                                          (straight-through)

It never holds an ``amax``: calibration is a no-op that says so (``GranQCalibrationWarning``),
and a checkpoint ``_amax`` is dropped on load (no ``.cuda()`` call, works on CPU-only hosts).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping, Optional, Union

import torch
from pytorch_quantization.nn import TensorQuantizer
from pytorch_quantization.tensor_quant import QuantDescriptor

from granq_ao.config import GranQConfig, normalize_fused
from granq_ao.functional import fake_quantize
from granq_ao.diagnostics import module_label
from granq_ao.granularity import Granularity
from granq_ao.quantizer_state import QuantizerStateMixin, config_property

__all__ = ["GranQDescriptor", "GranQTensorQuantizer", "GranQCalibrationWarning", "as_granq_descriptor"]

GranularityLike = Union[str, Granularity]


class GranQCalibrationWarning(UserWarning):
    """A calibration / static-range call on a GranQ quantizer was ignored (ranges stay dynamic)."""


@dataclasses.dataclass(frozen=True)
class GranQDescriptor:
    """Immutable description of a GranQ quantizer, in the style of ``QuantDescriptor``.

    Args:
        num_bits: 2..8.
        granularity: ``"granq"`` (per (sample, channel), default), ``"channel"`` (per channel
            over the batch), ``"tensor"``, ``"granq_iterative"``, or a granularity object
            from :mod:`granq_ao.granularity` (an object carries its own axis).
        axis: the channel axis (1 for NCHW activations; 0 for a per-output-channel weight).
        symmetric: zero-point 0 on a signed grid instead of the paper's asymmetric grid.
        fused: ``"auto"``, ``"compiled"`` or ``"eager"`` (same numbers; ``None``/``True``/``False`` too).
        check_finite: refuse NaN/inf input (default); ``False`` skips the check and its host read.
        name: optional label, shown in ``repr``.

    The options are validated by (and :attr:`config` is) a :class:`granq_ao.config.GranQConfig`:
    the same errors as every other GranQ API. Ranges are always dynamic, so there is no
    ``amax``, ``learn_amax`` or calibrator.
    """

    num_bits: int = 4
    granularity: GranularityLike = "granq"
    axis: int = 1
    symmetric: bool = False
    fused: Any = "auto"
    check_finite: bool = True
    name: Optional[str] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "fused", normalize_fused(self.fused))
        self.config  # validates every option (GranQConfig), ValueError/TypeError

    @property
    def config(self) -> GranQConfig:
        """The :class:`~granq_ao.config.GranQConfig` this descriptor describes."""
        return GranQConfig(bits=self.num_bits, granularity=self.granularity, axis=self.axis,
                           symmetric=self.symmetric, fused=self.fused, check_finite=self.check_finite)

    # QuantDescriptor-compatible read-only fields
    fake_quant = True
    amax = None
    learn_amax = False
    scale_amax = None

    @property
    def granularity_object(self) -> Granularity:
        return self.config.granularity

    quant_min = config_property("quant_min")
    quant_max = config_property("quant_max")

    def replace(self, **changes: Any) -> "GranQDescriptor":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def dict(self) -> dict:
        """Plain-data form (``GranQDescriptor(**d)`` rebuilds it for string granularities)."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        granularity = self.granularity_object
        label = f"{self.name}: " if self.name else ""
        return (f"{label}GranQDescriptor({self.num_bits}bit {granularity.name} "
                f"{'symmetric' if self.symmetric else 'asymmetric'} axis={self.axis} dynamic)")


def as_granq_descriptor(desc: Union[None, GranQDescriptor, QuantDescriptor, Mapping[str, Any]] = None,
                        **overrides: Any) -> GranQDescriptor:
    """Turn ``desc`` into a :class:`GranQDescriptor`.

    * ``None``: the default (4-bit GranQ); ``GranQDescriptor``: itself; a mapping: its fields.
    * a pytorch-quantization ``QuantDescriptor``: its ``num_bits``; its ``axis`` (``None``, an
      int or a 1-tuple) is the channel axis (``None`` -> 1). ``unsigned``, ``narrow_range`` and
      ``calib_method`` do not apply (the grid is set by ``symmetric``). A descriptor with a
      fixed or learned ``amax``, or ``fake_quant=False``, is refused: GranQ ranges are dynamic.

    ``overrides`` replace fields of the result (e.g. ``granularity="channel"``).
    """
    if desc is None:
        result = GranQDescriptor()
    elif isinstance(desc, GranQDescriptor):
        result = desc
    elif isinstance(desc, QuantDescriptor):
        result = _from_quant_descriptor(desc)
    elif isinstance(desc, Mapping):
        result = GranQDescriptor(**desc)
    else:
        raise TypeError(f"expected a GranQDescriptor, a QuantDescriptor or a dict; got {type(desc).__name__}")
    return result.replace(**overrides) if overrides else result


def _from_quant_descriptor(desc: QuantDescriptor) -> GranQDescriptor:
    if not desc.fake_quant:
        raise ValueError("GranQTensorQuantizer supports fake quantization only (fake_quant=True)")
    if desc.learn_amax or desc.amax is not None or desc.scale_amax is not None:
        raise ValueError(
            "GranQ ranges are computed from every input; a QuantDescriptor with amax, learn_amax "
            "or scale_amax describes a static range and cannot be used for a GranQ quantizer"
        )
    axis = desc.axis
    if isinstance(axis, (tuple, list)):
        if len(axis) != 1:
            raise ValueError(f"GranQ keeps one channel axis; got axis={desc.axis!r}")
        axis = axis[0]
    return GranQDescriptor(num_bits=desc.num_bits, axis=1 if axis is None else int(axis), name=desc.name)


class GranQTensorQuantizer(QuantizerStateMixin, TensorQuantizer):
    """A ``TensorQuantizer`` doing GranQ's dynamic fake-quantization (see the module docstring).

    Args:
        quant_desc: a :class:`GranQDescriptor`, a ``QuantDescriptor`` (see
            :func:`as_granq_descriptor`), a dict of descriptor fields, or ``None`` (4-bit GranQ).
        disabled: bypass the module (``enable()`` / ``disable()``).
        if_quant: run the fake-quant (``enable_quant()`` / ``disable_quant()``).
        if_clip: must be False (there is no learned amax to clip to).
        if_calib: ignored with a :class:`GranQCalibrationWarning` (ranges stay dynamic).
        **overrides: descriptor fields to change, e.g. ``granularity="channel"``.

    Output: ``inputs`` unchanged when disabled or quant is off; else the GranQ fake-quant of
    ``inputs`` with a straight-through gradient. Under ONNX export (either exporter) the same
    math is emitted as plain ops (ReduceMin/ReduceMax, Div, Round, Clip, ...), so the exported
    graph computes its ranges from its input at run time.

    ``_calibrator`` is ``None``, so pytorch-quantization's usual calibration loop
    (``if module._calibrator is not None: ... else: module.disable()``) skips it cleanly.

    Saved settings and labelled errors: :class:`granq_ao.quantizer_state.QuantizerStateMixin`
    (TensorQuantizer's own loader is bypassed: :meth:`_load_host_state`).
    """

    def __init__(self, quant_desc: Union[None, GranQDescriptor, QuantDescriptor, Mapping[str, Any]] = None,
                 disabled: bool = False, if_quant: bool = True, if_clip: bool = False,
                 if_calib: bool = False, **overrides: Any) -> None:
        desc = as_granq_descriptor(quant_desc, **overrides)
        if if_clip:
            raise ValueError("GranQTensorQuantizer has no learned amax: if_clip must be False")
        # The base class only stores these fields (calib_method=None: it creates no calibrator);
        # the GranQ descriptor is the source of truth.
        super().__init__(QuantDescriptor(num_bits=desc.num_bits, axis=desc.axis, name=desc.name, calib_method=None),
                         disabled=disabled, if_quant=if_quant, if_clip=False, if_calib=False)
        self._calibrator = None
        self._granq_desc = desc
        self._granq_config = desc.config  # validated once; the forward passes it to the core
        self._granq_location = ""  # set by the helpers to the module path, used in errors
        if if_calib:
            self.enable_calib()

    # ------------------------------------------------------------------ description
    @property
    def quant_desc(self) -> GranQDescriptor:
        return self._granq_desc

    granularity = config_property("granularity_object", holder="_granq_desc")
    symmetric = config_property("symmetric", holder="_granq_desc")

    @property
    def num_bits(self) -> int:
        return self._granq_desc.num_bits

    @num_bits.setter
    def num_bits(self, value: int) -> None:
        self._granq_desc = self._granq_desc.replace(num_bits=value)  # validated: 2..8
        self._granq_config = self._granq_desc.config
        self._num_bits = value

    @property
    def amax(self) -> None:
        """Always ``None``: GranQ ranges are computed from each input."""
        return None

    @amax.setter
    def amax(self, value: Any) -> None:
        warnings.warn("GranQTensorQuantizer ignores amax: its ranges are computed from each input",
                      GranQCalibrationWarning, stacklevel=2)

    @property
    def step_size(self) -> None:
        """``None``: the step size is per (sample, channel) and input-dependent."""
        return None

    # ------------------------------------------------------------------ calibration: no-ops
    def enable_calib(self) -> None:
        """No-op with a warning: GranQ has nothing to calibrate (ranges are dynamic)."""
        warnings.warn(
            f"{self._label()}: calibration is not used by GranQ (ranges are computed from every "
            "input at train and test time); enable_calib() does nothing",
            GranQCalibrationWarning, stacklevel=2)
        self._if_calib = False

    def disable_calib(self) -> None:
        self._if_calib = False

    def load_calib_amax(self, *args: Any, **kwargs: Any) -> None:
        """No-op with a warning: no amax is ever frozen."""
        warnings.warn(f"{self._label()}: load_calib_amax() does nothing, GranQ keeps dynamic ranges",
                      GranQCalibrationWarning, stacklevel=2)

    def init_learn_amax(self) -> None:
        raise RuntimeError("GranQTensorQuantizer has no learnable amax")

    def disable_clip(self) -> None:
        self._if_clip = False

    # ------------------------------------------------------------------ forward
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self._disabled or not self._if_quant:
            return inputs
        return self._quant_forward(inputs)

    def _quant_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        # Under an exporting tracer granq_ao.functional records its eager ops (no torch.compile,
        # no finite check): ReduceMin/ReduceMax -> scale/zero-point -> Round/Clip from the input.
        try:
            return fake_quantize(inputs, self._granq_config)
        except (TypeError, ValueError) as error:  # NonFiniteInputError included; same type, located
            raise self.labelled(error) from None

    # ------------------------------------------------------------------ state
    # the settings that shape the numbers travel with the state_dict (granq_ao.quantizer_state)
    def saved_configs(self) -> GranQConfig:
        return self._granq_config

    def _load_host_state(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                         error_msgs) -> None:
        # pytorch-quantization 2.1.3 moves a checkpoint `_amax` to CUDA in its loader (.cuda()),
        # which fails on CPU-only hosts; a GranQ quantizer has no amax: the key is dropped and
        # TensorQuantizer's loader bypassed (nn.Module's loads the rest).
        key = prefix + "_amax"
        if key in state_dict:
            state_dict.pop(key)
            warnings.warn(f"{self._label()}: ignoring '{key}' from the checkpoint (GranQ ranges are dynamic)",
                          GranQCalibrationWarning, stacklevel=5)
        torch.nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                              unexpected_keys, error_msgs)

    def error_label(self) -> str:
        return self._label(find=True)

    def _label(self, find: bool = False) -> str:
        """``GranQTensorQuantizer 'path.in.model'``; with ``find`` (error paths only) the path is
        looked up in the calling model when the helpers did not record it."""
        if self._granq_location or find:
            return module_label(self, self._granq_location)
        return type(self).__name__

    def extra_repr(self) -> str:
        if self._disabled:
            return "disabled"
        desc = self._granq_desc
        text = (f"{desc.num_bits}bit {self.granularity.name} "
                f"{'symmetric' if desc.symmetric else 'asymmetric'} axis={desc.axis} dynamic")
        text += " quant" if self._if_quant else ""
        return text
