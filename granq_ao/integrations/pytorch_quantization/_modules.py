"""Quant modules with GranQ input quantizers, and ``initialize()`` / ``deactivate()``.

``GranQConv2d`` etc. are pytorch-quantization quant modules (``QuantConv2d`` ...) whose
``_input_quantizer`` is a :class:`GranQTensorQuantizer`; the weight quantizer is
pytorch-quantization's own (per output channel by default) or, given a ``GranQDescriptor``,
another ``GranQTensorQuantizer``.

``initialize()`` monkey-patches ``torch.nn.Conv2d`` etc. with them, as
``pytorch_quantization.quant_modules.initialize()`` does with its own classes, so that models
built afterwards get GranQ quantizers; ``deactivate()`` puts back exactly the objects that
were there. ``granq_quant_modules(...)`` is the same as a context manager. Calls nest.

pytorch-quantization's own ``QuantConv2d.set_default_quant_desc_input`` (and ``_weight``, on
every quant module) is wrapped when this module is imported: given a ``GranQDescriptor`` it
raises a ``TypeError`` naming the GranQ module to use instead of NVIDIA's "{} is not an instance
of QuantDescriptor!"; any other value is handled by pytorch-quantization as before.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from pytorch_quantization import nn as quant_nn
from pytorch_quantization.nn import TensorQuantizer
from pytorch_quantization.nn.modules import _utils as quant_nn_utils
from pytorch_quantization.tensor_quant import QuantDescriptor

from ._quantizer import GranQDescriptor, GranQTensorQuantizer, as_granq_descriptor

__all__ = [
    "GranQConv1d", "GranQConv2d", "GranQConv3d", "GranQLinear",
    "GranQAvgPool2d", "GranQAdaptiveAvgPool2d", "GranQMaxPool2d",
    "GRANQ_MODULES", "DEFAULT_PATCHED_MODULES",
    "initialize", "deactivate", "granq_quant_modules",
]

DescriptorLike = Union[None, GranQDescriptor, QuantDescriptor, Mapping[str, Any]]
# Handed to the pytorch-quantization constructors, then replaced by the real quantizer.
_PLACEHOLDER_DESC = QuantDescriptor(num_bits=8)


class _GranQDefaults:
    """Class-level default descriptors, settable like pytorch-quantization's."""

    default_quant_desc_input: GranQDescriptor = GranQDescriptor()
    default_quant_desc_weight: Union[QuantDescriptor, GranQDescriptor] = QuantDescriptor(num_bits=4, axis=(0,))
    _has_weight = True  # pooling modules: False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """The wrapped torch.nn/quant_nn class's arguments; GranQ quantizers installed after."""
        plan = _Plan(type(self), kwargs, has_weight=self._has_weight)
        super().__init__(*args, **plan.nvidia_kwargs, **kwargs)
        plan.install(self)

    @classmethod
    def set_default_quant_desc_input(cls, value: DescriptorLike) -> None:
        cls.default_quant_desc_input = as_granq_descriptor(value)

    @classmethod
    def set_default_quant_desc_weight(cls, value: Union[QuantDescriptor, GranQDescriptor]) -> None:
        cls.default_quant_desc_weight = _check_weight_desc(value)

    def init_quantizer(self, quant_desc_input: QuantDescriptor, quant_desc_weight: Optional[QuantDescriptor] = None,
                       num_layers: None = None) -> None:
        """Placeholder quantizers, replaced by ``_Plan.install`` right after. (pytorch-quantization's
        version first checks its caller with ``inspect.stack()``, which reads the source of every
        frame on the stack: tenths of a second per module in deep stacks.)"""
        self._fake_quant = True
        self._input_quantizer = TensorQuantizer(quant_desc_input)
        if quant_desc_weight is not None:
            self._weight_quantizer = TensorQuantizer(quant_desc_weight)


def _check_weight_desc(value: Any) -> Union[QuantDescriptor, GranQDescriptor]:
    if isinstance(value, (QuantDescriptor, GranQDescriptor)):
        return value
    raise TypeError(f"a weight descriptor must be a QuantDescriptor or a GranQDescriptor, got {type(value).__name__}")


class _Plan:
    """The descriptors and factory kwargs popped from a constructor call."""

    def __init__(self, cls: type, kwargs: Dict[str, Any], has_weight: bool) -> None:
        self.input_desc = as_granq_descriptor(kwargs.pop("quant_desc_input", cls.default_quant_desc_input))
        self.weight_desc = _check_weight_desc(kwargs.pop("quant_desc_weight", cls.default_quant_desc_weight)) \
            if has_weight else None
        # pytorch-quantization's constructors refuse torch.nn's device=/dtype= arguments.
        self.factory = {key: kwargs.pop(key) for key in ("device", "dtype") if key in kwargs}
        self.nvidia_kwargs: Dict[str, Any] = {"quant_desc_input": _PLACEHOLDER_DESC}
        if has_weight:
            self.nvidia_kwargs["quant_desc_weight"] = (
                self.weight_desc if isinstance(self.weight_desc, QuantDescriptor) else _PLACEHOLDER_DESC)

    def install(self, module: torch.nn.Module) -> None:
        module._input_quantizer = GranQTensorQuantizer(self.input_desc)
        if isinstance(self.weight_desc, GranQDescriptor):
            module._weight_quantizer = GranQTensorQuantizer(self.weight_desc)
        if self.factory:
            module.to(**self.factory)


class GranQConv1d(_GranQDefaults, quant_nn.QuantConv1d):
    """``QuantConv1d`` with a GranQ input quantizer (accepts ``torch.nn.Conv1d``'s arguments)."""


class GranQConv2d(_GranQDefaults, quant_nn.QuantConv2d):
    """``QuantConv2d`` with a GranQ input quantizer (accepts ``torch.nn.Conv2d``'s arguments)."""


class GranQConv3d(_GranQDefaults, quant_nn.QuantConv3d):
    """``QuantConv3d`` with a GranQ input quantizer (accepts ``torch.nn.Conv3d``'s arguments)."""


class GranQLinear(_GranQDefaults, quant_nn.QuantLinear):
    """``QuantLinear`` with a GranQ input quantizer (rank-2 inputs: one range per sample)."""


class GranQAvgPool2d(_GranQDefaults, quant_nn.QuantAvgPool2d):
    """``QuantAvgPool2d`` with a GranQ input quantizer."""

    _has_weight = False


class GranQAdaptiveAvgPool2d(_GranQDefaults, quant_nn.QuantAdaptiveAvgPool2d):
    """``QuantAdaptiveAvgPool2d`` with a GranQ input quantizer."""

    _has_weight = False


class GranQMaxPool2d(_GranQDefaults, quant_nn.QuantMaxPool2d):
    """``QuantMaxPool2d`` with a GranQ input quantizer."""

    _has_weight = False


#: torch.nn name -> GranQ quant module that ``initialize(modules=...)`` can patch in.
GRANQ_MODULES: Dict[str, type] = {
    "Conv1d": GranQConv1d, "Conv2d": GranQConv2d, "Conv3d": GranQConv3d, "Linear": GranQLinear,
    "AvgPool2d": GranQAvgPool2d, "AdaptiveAvgPool2d": GranQAdaptiveAvgPool2d, "MaxPool2d": GranQMaxPool2d,
}
#: Patched by default: the layers with weights.
DEFAULT_PATCHED_MODULES: Tuple[str, ...] = ("Conv1d", "Conv2d", "Conv3d", "Linear")


def _refusing_granq_descriptor(original: classmethod, role: str) -> classmethod:
    """pytorch-quantization's ``set_default_quant_desc_<role>`` that refuses a ``GranQDescriptor``
    with a message naming what to use (its own check said "{} is not an instance of
    QuantDescriptor!"); every other value goes to the original."""
    function = original.__func__

    def set_default(cls, value):
        if isinstance(value, GranQDescriptor):
            name = cls.__name__[len("Quant"):] if cls.__name__.startswith("Quant") else cls.__name__
            granq = f"GranQ{name}" if name in GRANQ_MODULES else "GranQConv2d (etc.)"
            raise TypeError(
                f"{cls.__name__}.set_default_quant_desc_{role}: {cls.__name__} is pytorch-quantization's own "
                "module, whose quantizers are NVIDIA TensorQuantizers and cannot take a GranQDescriptor. Use "
                f"granq_ao.integrations.pytorch_quantization.{granq}.set_default_quant_desc_{role}(...), "
                "initialize(input_desc=...), or replace_input_quantizers(model, desc) on a built model.")
        return function(cls, value)

    set_default.__doc__ = function.__doc__
    set_default._granq_refuses = True
    return classmethod(set_default)


for _mixin in (quant_nn_utils.QuantMixin, quant_nn_utils.QuantInputMixin):
    for _role in ("input", "weight"):
        _original = _mixin.__dict__.get(f"set_default_quant_desc_{_role}")
        if isinstance(_original, classmethod) and not getattr(_original.__func__, "_granq_refuses", False):
            setattr(_mixin, f"set_default_quant_desc_{_role}", _refusing_granq_descriptor(_original, _role))


class _Patch:
    """What one ``initialize()`` changed, to undo it exactly."""

    def __init__(self, names: Sequence[str]) -> None:
        self.torch_nn: Dict[str, Any] = {name: getattr(torch.nn, name) for name in names}
        self.defaults: Dict[type, Tuple[Any, Any]] = {
            cls: (cls.__dict__.get("default_quant_desc_input"), cls.__dict__.get("default_quant_desc_weight"))
            for cls in (GRANQ_MODULES[name] for name in names)
        }

    def undo(self) -> None:
        for name, original in self.torch_nn.items():
            setattr(torch.nn, name, original)
        for cls, saved in self.defaults.items():
            for attribute, value in zip(("default_quant_desc_input", "default_quant_desc_weight"), saved):
                if value is None:
                    if attribute in cls.__dict__:
                        delattr(cls, attribute)
                else:
                    setattr(cls, attribute, value)


_patches: List[_Patch] = []
_patch_lock = threading.Lock()


def initialize(input_desc: DescriptorLike = None,
               weight_desc: Union[None, QuantDescriptor, GranQDescriptor] = None,
               modules: Sequence[str] = DEFAULT_PATCHED_MODULES) -> None:
    """Make ``torch.nn.<name>`` build GranQ quant modules until :func:`deactivate`.

    Args:
        input_desc: the input quantizers' descriptor (default: 4-bit GranQ); a
            ``QuantDescriptor`` is accepted (see ``as_granq_descriptor``).
        weight_desc: the weight quantizers' descriptor: a ``QuantDescriptor`` (default:
            pytorch-quantization per output channel, ``axis=(0,)``, with ``input_desc``'s
            bits) or a ``GranQDescriptor`` (e.g. ``granularity="channel", axis=0`` for
            GranQ's asymmetric per-output-channel math, as torch.ao's path uses).
        modules: torch.nn names to patch, from ``GRANQ_MODULES``
            (default ``DEFAULT_PATCHED_MODULES``: Conv1d/2d/3d and Linear).

    Descriptors can still be given per module: ``torch.nn.Conv2d(..., quant_desc_input=...)``.
    """
    input_desc = as_granq_descriptor(input_desc)
    if weight_desc is None:
        weight_desc = QuantDescriptor(num_bits=input_desc.num_bits, axis=(0,))
    weight_desc = _check_weight_desc(weight_desc)
    unknown = [name for name in modules if name not in GRANQ_MODULES]
    if unknown:
        raise ValueError(f"cannot patch {unknown}; choose from {sorted(GRANQ_MODULES)}")
    with _patch_lock:
        patch = _Patch(list(dict.fromkeys(modules)))
        for name in patch.torch_nn:
            cls = GRANQ_MODULES[name]
            cls.default_quant_desc_input = input_desc
            cls.default_quant_desc_weight = weight_desc
            setattr(torch.nn, name, cls)
        _patches.append(patch)


def deactivate() -> None:
    """Undo the latest :func:`initialize`: ``torch.nn`` gets back the very same objects."""
    with _patch_lock:
        if not _patches:
            raise RuntimeError("granq_ao deactivate() called without a matching initialize()")
        _patches.pop().undo()


@contextlib.contextmanager
def granq_quant_modules(input_desc: DescriptorLike = None,
                        weight_desc: Union[None, QuantDescriptor, GranQDescriptor] = None,
                        modules: Sequence[str] = DEFAULT_PATCHED_MODULES) -> Iterator[None]:
    """``with granq_quant_modules(...): model = build()``: :func:`initialize` then
    :func:`deactivate`, even when the block raises."""
    initialize(input_desc, weight_desc, modules)
    try:
        yield
    finally:
        deactivate()
