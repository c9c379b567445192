"""QConfigs and QConfigMappings for torch.ao QAT, named and shaped like torch.ao's.

``get_granq_qconfig`` mirrors ``torch.ao.quantization.get_default_qat_qconfig`` (eager and FX);
``get_granq_qat_qconfig_mapping`` mirrors ``get_default_qat_qconfig_mapping``: the same special
cases (fixed-qparams ops, ``reshape``, transposed convs, LayerNorm), GranQ everywhere else::

    qmap = get_granq_qat_qconfig_mapping(weight_bits=3, act_bits=3)
    qmap = get_granq_qat_qconfig_mapping(GranQScheme.from_kwargs(3, 3, act_placement="paper"))
    qat = granq_ao.prepare_qat_fx(model.train(), qmap, example_inputs)

Both take either the keyword options (validated by :meth:`granq_ao.config.GranQScheme.from_kwargs`)
or a :class:`~granq_ao.config.GranQScheme` as first argument. Activations:
:class:`GranQFakeQuantize` with the scheme's activation config, ``quint8`` label. Weights: the
same module with the weight config (``ch_axis=0``), ``qint8`` label.

``act_placement="paper"`` marks the mapping so that :func:`granq_ao.prepare_qat_fx` keeps
activation fake-quants only on ReLU/ReLU6 outputs (see :mod:`.placement`); ``"inputs"`` only on
the inputs of conv/linear layers (see :mod:`.input_placement`). torch's own ``prepare_qat_fx``
cannot apply them: given such a mapping it warns (:class:`PlacementWarning`).
"""
from __future__ import annotations

import copy
import sys
import warnings
from typing import Union

import torch
from torch.ao.quantization import QConfig, QConfigMapping, get_default_qat_qconfig_mapping
from torch.ao.quantization.fake_quantize import FixedQParamsFakeQuantize
from torch.ao.quantization.observer import ReuseInputObserver, _PartialWrapper

from granq_ao.config import GranQScheme, PlacementWarning, check_choice, keyword_defaults, reject_options_with

from .fake_quantize import GranQFakeQuantize
from .observer import PicklablePartial

__all__ = ["GranQQConfigMapping", "PlacementWarning", "get_granq_qconfig", "get_granq_qat_qconfig_mapping"]

_BACKENDS = ("x86", "fbgemm", "qnnpack", "onednn")


class GranQQConfigMapping(QConfigMapping):
    """A ``QConfigMapping`` that also carries the :class:`~granq_ao.config.GranQScheme` it was made
    from, whose ``placement`` (``"all"`` as torch.ao does, ``"paper"``: after ReLU/ReLU6 only,
    ``"inputs"``: conv/linear inputs only) :func:`granq_ao.prepare_qat_fx` applies."""

    def __init__(self, act_placement: Union[str, GranQScheme] = "all") -> None:
        super().__init__()
        self.scheme = (act_placement if isinstance(act_placement, GranQScheme)
                       else GranQScheme(placement=act_placement))

    @property
    def act_placement(self) -> str:
        return self.scheme.placement

    def __deepcopy__(self, memo):
        # torch's prepare_fx deep-copies the mapping first: the one moment to tell a user of
        # torch's prepare_qat_fx that the "paper"/"inputs" placement will not happen.
        if self.act_placement != "all" and _called_by_torch_prepare_only():
            what, fix = _PLACEMENT_WORDS[self.act_placement]
            warnings.warn(
                f"this mapping asks for act_placement={self.act_placement!r} ({what}), which torch.ao's "
                "prepare_qat_fx cannot apply: the model gets torch.ao's placement (every op's input and "
                f"output). Use granq_ao.prepare_qat_fx, or call {fix}(prepared) afterwards.",
                PlacementWarning, stacklevel=2)
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        for key, value in self.__dict__.items():
            setattr(copied, key, copy.deepcopy(value, memo))
        return copied


_PLACEMENT_WORDS = {
    "paper": ("activation fake-quants only on ReLU/ReLU6 outputs", "granq_ao.apply_paper_placement"),
    "inputs": ("activation fake-quants only on the inputs of conv/linear layers",
               "granq_ao.integrations.torch_ao.apply_input_placement"),
}


def _called_by_torch_prepare_only() -> bool:
    """Whether torch.ao's FX prepare is on the call stack and granq_ao's prepare is not."""
    torch_prepare = ours = False
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith("torch.ao.quantization"):
            torch_prepare = True
        elif module == __name__.rpartition(".")[0] + ".prepare":
            ours = True
        frame = frame.f_back
    return torch_prepare and not ours


def _scheme(first, function, **kwargs) -> GranQScheme:
    """The scheme given as first argument (``ValueError`` if a keyword of ``function`` also differs
    from its default), or the one the keywords name (``first`` = weight_bits)."""
    if isinstance(first, GranQScheme):
        reject_options_with(first, kwargs, keyword_defaults(function))
        return first
    return GranQScheme.from_kwargs(first, **kwargs)


def _qconfig(scheme: GranQScheme, averaging_constant: float = 0.01, weight_config=None) -> QConfig:
    activation = GranQFakeQuantize.with_args(config=scheme.activation, dtype=torch.quint8,
                                             averaging_constant=averaging_constant)
    weight = GranQFakeQuantize.with_args(config=weight_config or scheme.weight, dtype=torch.qint8,
                                         averaging_constant=1.0)
    # Build once now: observer options (averaging_constant, ...) fail here, not inside prepare.
    activation()
    weight()
    return QConfig(activation=activation, weight=weight)


def get_granq_qconfig(weight_bits: Union[int, GranQScheme] = 4, act_bits: int = 4,
                      act_granularity: str = "granq", weight_granularity: str = "channel",
                      symmetric_weights: bool = False, symmetric_acts: bool = False, fused="auto",
                      averaging_constant: float = 0.01, check_finite: bool = True) -> QConfig:
    """A QAT ``QConfig`` (eager ``model.qconfig = ...`` or FX): GranQ fake-quant for activations
    and weights (see the module docstring). ``weight_bits`` may be a
    :class:`~granq_ao.config.GranQScheme` (the other scheme options are then its own: giving one too
    is a ``ValueError``).
    ``averaging_constant``: the activation observers' running-range weight (static export only).
    ``check_finite=False`` drops the per-call NaN/inf check (and its host read: a sync on GPU)."""
    scheme = _scheme(weight_bits, get_granq_qconfig, act_bits=act_bits, act_granularity=act_granularity,
                     weight_granularity=weight_granularity, symmetric_weights=symmetric_weights,
                     symmetric_acts=symmetric_acts, fused=fused, check_finite=check_finite)
    return _qconfig(scheme, averaging_constant)


def _keeps_torch_activation(qconfig: QConfig) -> bool:
    """Fixed-qparams ops (sigmoid, tanh, softmax, ...) and ``reshape`` (reuses its input's
    observer) keep torch.ao's activation: their output range is not data dependent."""
    target = qconfig.activation
    # unwrap torch.ao's with_args (_PartialWrapper: .p) and functools.partial (.func)
    while not isinstance(target, type) and (hasattr(target, "p") or hasattr(target, "func")):
        target = getattr(target, "p", None) or target.func
    return isinstance(target, type) and issubclass(target, (FixedQParamsFakeQuantize, ReuseInputObserver))


def picklable_qconfig(qconfig):
    """``qconfig`` with torch.ao's ``with_args`` constructors rewrapped as :class:`PicklablePartial`
    (same constructor and arguments): torch's prepare then stores picklable qconfigs on the
    modules it prepares, so the prepared model can be saved whole (``torch.save``)."""
    if qconfig is None:
        return None

    def rewrap(constructor):
        if isinstance(constructor, _PartialWrapper) and not isinstance(constructor, PicklablePartial):
            result = PicklablePartial(constructor.p)
            result.callable_args = dict(constructor.callable_args)
            return result
        return constructor

    return QConfig(activation=rewrap(qconfig.activation), weight=rewrap(qconfig.weight))


def get_granq_qat_qconfig_mapping(weight_bits: Union[int, GranQScheme] = 4, act_bits: int = 4,
                                  act_granularity: str = "granq", weight_granularity: str = "channel",
                                  act_placement: str = "all", backend: str = "x86",
                                  symmetric_weights: bool = False, symmetric_acts: bool = False,
                                  fused="auto", check_finite: bool = True) -> GranQQConfigMapping:
    """torch.ao's default QAT mapping for ``backend`` with GranQ in place of its default qconfig.

    ``weight_bits`` may be a :class:`~granq_ao.config.GranQScheme` (the other options but
    ``backend`` are then its own: giving one too is a ``ValueError``). Ops with fixed output ranges (sigmoid, tanh, softmax, ...) and
    ``reshape`` keep torch.ao's qconfigs. Transposed convolutions get per-tensor weight ranges
    (their weight's output channels are on dim 1) for torch's static converter; torch.ao has no
    QAT module for them, so their weights stay float in QAT and in
    :func:`granq_ao.convert_to_reference_fx` (activations around them are quantized in both).
    ``nn.Embedding``/``nn.EmbeddingBag`` are left float (qconfig None). ``act_placement="paper"``:
    see :class:`GranQQConfigMapping`.
    """
    scheme = _scheme(weight_bits, get_granq_qat_qconfig_mapping, act_bits=act_bits,
                     act_granularity=act_granularity, weight_granularity=weight_granularity, act_placement=act_placement,
                     symmetric_weights=symmetric_weights, symmetric_acts=symmetric_acts, fused=fused,
                     check_finite=check_finite)
    check_choice(backend, _BACKENDS, "backend")
    qconfig = _qconfig(scheme)
    transpose_qconfig = _qconfig(scheme, weight_config=scheme.weight.replace(granularity="tensor"))
    torch_default = get_default_qat_qconfig_mapping(backend)
    mapping = GranQQConfigMapping(scheme)
    mapping.set_global(qconfig)
    transposed = {torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d,
                  torch.nn.functional.conv_transpose1d, torch.nn.functional.conv_transpose2d,
                  torch.nn.functional.conv_transpose3d}
    for float_only in (torch.nn.Embedding, torch.nn.EmbeddingBag):
        # torch.ao quantizes embeddings only weight-only with float qparams (its QAT embedding
        # asserts that qscheme): GranQ leaves them float in QAT and convert; the next op's
        # input fake-quant quantizes what they return.
        mapping.set_object_type(float_only, None)
    for object_type, object_qconfig in torch_default.object_type_qconfigs.items():
        if object_type in transposed:
            mapping.set_object_type(object_type, transpose_qconfig)
        elif object_qconfig is None or _keeps_torch_activation(object_qconfig):
            mapping.set_object_type(object_type, picklable_qconfig(object_qconfig))
        else:  # LayerNorm, PReLU: torch.ao's special weight handling, GranQ activation
            mapping.set_object_type(object_type, picklable_qconfig(
                QConfig(activation=qconfig.activation, weight=object_qconfig.weight)))
    return mapping
