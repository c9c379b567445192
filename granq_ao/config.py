"""The options of granq_ao, validated in one place: :class:`GranQConfig` and :class:`GranQScheme`.

``GranQConfig`` describes one quantizer (an activation or a weight fake-quant)::

    GranQConfig(bits=3)                                   # GranQ: per (sample, channel), asymmetric
    GranQConfig.for_activation(3, "tensor")               # the paper's layer-wise baseline
    GranQConfig.for_weight(4, "kernel")                   # per (out, in) slice: the official code

``GranQScheme`` is what a whole network gets: an activation config, a weight config and where
activations are quantized (``placement``: ``"all"`` as the host toolchain does, ``"paper"``:
only ReLU/ReLU6 outputs, or ``"inputs"``: the input of every conv/linear, as TensorRT and
modelopt quantize). Every adapter (torch.ao, pytorch-quantization, torchao, modelopt),
the zero-shot config and the CLIs take or build these; the keyword APIs
(``get_granq_qat_qconfig_mapping(weight_bits=..., act_bits=...)``) are thin wrappers over
:meth:`GranQScheme.from_kwargs`.

Vocabularies (one spelling each, used by the Python API and the CLIs alike):

=======================  ====================================================================
``ACT_GRANULARITIES``    ``granq`` (per (sample, channel)), ``channel``, ``tensor``,
                         ``granq_iterative`` (GranQ's ranges by a Python loop: ``iterative=True``)
``WEIGHT_GRANULARITIES`` ``channel`` (per output channel), ``kernel`` (per (out, in) slice:
                         GranQ's per-(dim 0, dim 1) ranges applied to a weight), ``tensor``
``PLACEMENTS``           ``all`` (the host toolchain's), ``paper`` (ReLU/ReLU6 outputs only),
                         ``inputs`` (the input of every conv/linear, nothing else)
``FUSED_MODES``          ``auto`` (torch.compile'd where it works, else eager), ``compiled``,
                         ``eager``; the numbers are the same. Legacy ``None/True/False`` map to them.
=======================  ====================================================================
"""
from __future__ import annotations

import dataclasses
import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .granularity import Granularity, PerChannel, PerSampleChannel, PerTensor

__all__ = [
    "GranQConfig", "GranQScheme", "MIN_BITS", "MAX_BITS", "ACT_GRANULARITIES", "WEIGHT_GRANULARITIES",
    "PLACEMENTS", "PlacementWarning", "FUSED_MODES", "quant_range", "check_bits", "check_choice", "normalize_fused",
    "as_granularity", "keyword_defaults", "reject_options_with",
]

MIN_BITS = 2
MAX_BITS = 8
ACT_GRANULARITIES = ("granq", "channel", "tensor", "granq_iterative")
WEIGHT_GRANULARITIES = ("channel", "kernel", "tensor")
PLACEMENTS = ("all", "paper", "inputs")
FUSED_MODES = ("auto", "compiled", "eager")

_LEGACY_FUSED = {None: "auto", True: "compiled", False: "eager"}


class PlacementWarning(UserWarning):
    """An activation placement that cannot be applied, or that found no activation to quantize
    (e.g. ``"paper"`` on a network without ReLU/ReLU6)."""


# ----------------------------------------------------------------------------- field checks
def check_bits(bits: Any, name: str = "bits") -> int:
    """``bits`` as a Python int if it is an integer (``int``, ``numpy.int64``, ...; not ``bool``,
    float or str) in [MIN_BITS, MAX_BITS], else ``ValueError``."""
    try:
        value = operator.index(bits) if not isinstance(bits, bool) else None
    except TypeError:
        value = None
    if value is None or not MIN_BITS <= value <= MAX_BITS:
        raise ValueError(f"{name} must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return value


def quant_range(bits: int, symmetric: bool = False) -> Tuple[int, int]:
    """Integer grid ``(q_min, q_max)``: ``[0, 2^b - 1]``, or ``[-2^(b-1), 2^(b-1) - 1]`` when
    ``symmetric``. ``ValueError`` for bits outside [MIN_BITS, MAX_BITS]."""
    bits = check_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def check_choice(value: Any, choices: Sequence[str], name: str) -> str:
    """``value`` if it is one of ``choices``, else ``ValueError`` listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def normalize_fused(value: Any, name: str = "fused") -> str:
    """One of :data:`FUSED_MODES`; the legacy ``None``/``True``/``False`` map to auto/compiled/eager."""
    if value is None or isinstance(value, bool):
        return _LEGACY_FUSED[value]
    return check_choice(value, FUSED_MODES, name)


def as_granularity(value: Union[str, Granularity], axis: int = 1) -> Granularity:
    """A granularity object from a name of :data:`ACT_GRANULARITIES` (``"granq_iterative"`` gives
    ``PerSampleChannel``: iterating is a way of running, see ``GranQConfig.iterative``) resolved
    with channel ``axis``; granularity objects pass through unchanged."""
    if isinstance(value, (PerTensor, PerChannel, PerSampleChannel)):
        return value
    check_choice(value, ACT_GRANULARITIES, "granularity")
    if value == "tensor":
        return PerTensor()
    if value == "channel":
        return PerChannel(axis)
    return PerSampleChannel(axis)


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _check_axis(value: Any, name: str = "axis") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return value


# ----------------------------------------------------------------------------- one quantizer
@dataclass(frozen=True)
class GranQConfig:
    """One GranQ quantizer, validated on construction (``ValueError``/``TypeError``).

    Args:
        bits: 2..8.
        granularity: a granularity object (:mod:`granq_ao.granularity`) or a name:
            ``"granq"`` (per (sample, channel)), ``"channel"`` (per channel ``axis``),
            ``"tensor"``, or ``"granq_iterative"`` (= ``"granq"`` with ``iterative=True``).
            Stored as the object.
        axis: the channel axis (1 for NCHW activations, 0 for weights). Names are resolved with it;
            observers and static exports keep one range per index of it.
        symmetric: signed grid with zero point 0 instead of the paper's asymmetric min/max grid.
        iterative: compute the ranges with a Python loop over the kept indices (the paper's slow
            reference; the same numbers).
        fused: ``"auto"``, ``"compiled"`` or ``"eager"`` (same numbers; see ``granq_ao.functional``).
        check_finite: refuse NaN/inf input (one host read per call; a sync on GPU).
    """

    bits: int = 4
    granularity: Union[str, Granularity] = "granq"
    axis: int = 1
    symmetric: bool = False
    iterative: bool = False
    fused: str = "auto"
    check_finite: bool = True

    def __post_init__(self) -> None:
        # frozen: normalized fields are written with object.__setattr__
        object.__setattr__(self, "bits", check_bits(self.bits))
        _check_axis(self.axis)
        _check_bool(self.symmetric, "symmetric")
        _check_bool(self.iterative, "iterative")
        _check_bool(self.check_finite, "check_finite")
        object.__setattr__(self, "fused", normalize_fused(self.fused))
        if self.granularity == "granq_iterative":
            object.__setattr__(self, "iterative", True)
        if not isinstance(self.granularity, (str, PerTensor, PerChannel, PerSampleChannel)):
            raise TypeError(f"granularity must be a name ({', '.join(ACT_GRANULARITIES)}) or a "
                            f"granularity object, got {self.granularity!r}")
        object.__setattr__(self, "granularity", as_granularity(self.granularity, self.axis))

    @classmethod
    def for_activation(cls, bits: int = 4, granularity: Union[str, Granularity] = "granq",
                       **options: Any) -> "GranQConfig":
        """An activation quantizer (channel axis 1); ``granularity`` from :data:`ACT_GRANULARITIES`."""
        if isinstance(granularity, str):
            check_choice(granularity, ACT_GRANULARITIES, "act_granularity")
        return cls(bits=bits, granularity=granularity, axis=1, **options)

    @classmethod
    def for_weight(cls, bits: int = 4, granularity: Union[str, Granularity] = "channel",
                   **options: Any) -> "GranQConfig":
        """A weight quantizer (output channels on axis 0); ``granularity`` from
        :data:`WEIGHT_GRANULARITIES`: ``kernel`` is GranQ's per-(dim 0, dim 1) range on a weight
        ``(out, in, *k)``, i.e. ``PerSampleChannel(axis=1, batch_axis=0)`` (per row if 2-D)."""
        if isinstance(granularity, str):
            check_choice(granularity, WEIGHT_GRANULARITIES, "weight_granularity")
            granularity = {"channel": PerChannel(0), "kernel": PerSampleChannel(axis=1, batch_axis=0),
                           "tensor": PerTensor()}[granularity]
        return cls(bits=bits, granularity=granularity, axis=0, **options)

    @property
    def name(self) -> str:
        """The vocabulary name of this config: ``granq``/``granq_iterative``/``channel``/``tensor``,
        or ``kernel`` for a weight config (axis 0) with per-(dim 0, dim 1) ranges."""
        granularity = self.granularity
        if isinstance(granularity, PerSampleChannel):
            if self.axis == 0 and (granularity.batch_axis, granularity.axis) == (0, 1):
                return "kernel"
            return "granq_iterative" if self.iterative else "granq"
        return granularity.name

    @property
    def quant_min(self) -> int:
        """Lower end of the integer grid (:func:`quant_range`)."""
        return quant_range(self.bits, self.symmetric)[0]

    @property
    def quant_max(self) -> int:
        """Upper end of the integer grid (:func:`quant_range`)."""
        return quant_range(self.bits, self.symmetric)[1]

    def replace(self, **changes: Any) -> "GranQConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        return (f"{self.bits}-bit {self.name} {'symmetric' if self.symmetric else 'asymmetric'}"
                + (f" axis={self.axis}" if not isinstance(self.granularity, PerTensor) else ""))


# ----------------------------------------------------------------------------- a network's scheme
@dataclass(frozen=True)
class GranQScheme:
    """How a network is quantized: ``activation`` and ``weight`` configs and the activation
    ``placement`` (``"all"``: wherever the host toolchain observes activations; ``"paper"``: only
    the outputs of ReLU/ReLU6, as the paper and its official code do; ``"inputs"``: the input of
    every conv/linear and nothing else, as TensorRT and modelopt quantize: works on any network)."""

    activation: GranQConfig = field(default_factory=GranQConfig.for_activation)
    weight: GranQConfig = field(default_factory=GranQConfig.for_weight)
    placement: str = "all"

    def __post_init__(self) -> None:
        for name in ("activation", "weight"):
            if not isinstance(getattr(self, name), GranQConfig):
                raise TypeError(f"{name} must be a GranQConfig, got {getattr(self, name)!r}")
        check_choice(self.placement, PLACEMENTS, "act_placement")

    @classmethod
    def from_kwargs(cls, weight_bits: int = 4, act_bits: int = 4, act_granularity: str = "granq",
                    weight_granularity: str = "channel", act_placement: str = "all",
                    symmetric_weights: bool = False, symmetric_acts: bool = False,
                    fused: Any = "auto", check_finite: bool = True) -> "GranQScheme":
        """The scheme named by the keyword API shared by every adapter and CLI."""
        check_bits(weight_bits, "weight_bits")
        check_bits(act_bits, "act_bits")
        fused = normalize_fused(fused)
        return cls(
            activation=GranQConfig.for_activation(act_bits, act_granularity, symmetric=symmetric_acts,
                                                  fused=fused, check_finite=check_finite),
            weight=GranQConfig.for_weight(weight_bits, weight_granularity, symmetric=symmetric_weights,
                                          fused=fused, check_finite=check_finite),
            placement=act_placement)

    def replace(self, **changes: Any) -> "GranQScheme":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """``W4A4: activations 4-bit granq asymmetric axis=1 (paper placement), weights ...``."""
        return (f"W{self.weight.bits}A{self.activation.bits}: activations {self.activation} "
                f"({self.placement} placement), weights {self.weight}")


# ----------------------------------------------------------------------------- an object or keywords
def keyword_defaults(function: Callable) -> Dict[str, Any]:
    """``{parameter: default}`` of ``function``'s parameters that have a default."""
    return {name: parameter.default for name, parameter in inspect.signature(function).parameters.items()
            if parameter.default is not inspect.Parameter.empty}


def _is_default(name: str, value: Any, default: Any) -> bool:
    if name == "fused" and value is None:
        return default in (None, "auto")  # None: the legacy spelling of "auto"
    # same type first: a value of another type (a tensor, 1 for True) was given on purpose
    return value is default or (type(value) is type(default) and value == default)


def reject_options_with(value: Any, options: Mapping[str, Any], defaults: Optional[Mapping[str, Any]] = None) -> None:
    """``ValueError`` naming the keyword ``options`` given together with ``value`` (a
    :class:`GranQScheme` or :class:`GranQConfig`, which holds every option itself: a keyword would
    be silently ignored; torchao's ``QATConfig`` refuses the same mix). With ``defaults`` (the
    public function's :func:`keyword_defaults`), an option equal to its default counts as not given."""
    given: List[str] = sorted(name for name, option in options.items()
                              if defaults is None or name not in defaults
                              or not _is_default(name, option, defaults[name]))
    if given:
        kind = type(value).__name__
        raise ValueError(f"cannot specify both a {kind} and the keyword option(s) {', '.join(given)}: the "
                         f"{kind} holds every option (change it with {kind}.replace(...), or give only keywords)")
