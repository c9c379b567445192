"""``GranQQATConfig``: GranQ QAT through ``torchao.quantization.quantize_`` for eager models.

Two steps, as torchao's own ``QATConfig``::

    quantize_(model, GranQQATConfig(GranQScheme.from_kwargs(4, 4)), filter_fn=is_conv_or_linear)
    train(model)
    quantize_(model, GranQQATConfig(step="convert"), filter_fn=is_conv_or_linear)

* ``step="prepare"`` swaps every ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` and
  ``nn.Linear`` (exact types) for its GranQ QAT class (:mod:`.qat_modules`): the same
  parameters, ``y = op(fq_act(x), fq_w(weight), bias)``.
* ``step="convert"`` swaps each QAT module back: ``target="reference"`` (default) gives the
  reference form (:mod:`.reference_modules`: float weights, explicit ``granq_ao`` q/dq ops,
  equal to the QAT model in eval, exportable); ``target="float"`` the plain host layers (no
  quantization; e.g. to apply another torchao config next, or to train again); ``target="float"``
  also turns reference modules back into plain layers. Other modules are left alone.

``quantize_``'s default filter selects ``nn.Linear`` only, so pass ``filter_fn=is_conv_or_linear``
to both steps. Placement: activations are quantized at every swapped layer's input and nowhere
else, i.e. the ``"inputs"`` placement; ``"all"`` (the host's own placement: torchao's QAT also
fake-quantizes each swapped layer's input) means the same here. Module swapping sees no data
flow: a value read by two swapped layers is fake-quantized by each (the same numbers), and the
paper's ReLU-output placement (``"paper"``) is refused: use :class:`~.quantizer.GranQQuantizer`
(PT2E).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization import register_quantize_module_handler

from granq_ao.config import GranQScheme, check_choice

from .layer_forward import HOST_LAYER_CLASSES, host_layer_class
from .qat_modules import QAT_CLASSES, GranQQAT
from .reference_modules import GranQReference

__all__ = ["GranQQATConfig", "is_conv_or_linear", "QAT_STEPS", "CONVERT_TARGETS"]

QAT_STEPS = ("prepare", "convert")
CONVERT_TARGETS = ("reference", "float")
#: the placements module swapping can apply (both: the input of every swapped layer)
SUPPORTED_PLACEMENTS = ("all", "inputs")


@dataclass(frozen=True)
class GranQQATConfig(AOBaseConfig):
    """``quantize_`` config (module docstring).

    Args:
        scheme: the :class:`GranQScheme` the prepare step puts on each layer (``placement``
            ``"inputs"``, or ``"all"``, the same here).
        step: ``"prepare"`` or ``"convert"``.
        target: what ``convert`` produces: ``"reference"`` (q/dq ops) or ``"float"`` (plain layers).
    """

    scheme: GranQScheme = field(default_factory=GranQScheme)
    step: str = "prepare"
    target: str = "reference"

    def __post_init__(self) -> None:
        if not isinstance(self.scheme, GranQScheme):
            raise TypeError(f"scheme must be a GranQScheme, got {self.scheme!r}")
        check_choice(self.step, QAT_STEPS, "step")
        check_choice(self.target, CONVERT_TARGETS, "target")
        if self.scheme.placement not in SUPPORTED_PLACEMENTS:
            raise ValueError(
                f"GranQQATConfig quantizes the input of every swapped layer (act_placement 'inputs', or "
                f"'all', the same here), not {self.scheme.placement!r}: the paper's ReLU-output placement "
                "needs the graph: use GranQQuantizer with prepare_qat_pt2e")


def is_conv_or_linear(module: nn.Module, fqn: str = "") -> bool:
    """``quantize_`` filter for both steps: a plain ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``
    or ``nn.Linear`` (exact type: a subclass may compute something else), or a GranQ QAT or
    reference module (so that preparing twice is refused rather than silently skipped). Any other
    subclass of those layers is left in float with a warning naming it (once per class)."""
    if type(module) in QAT_CLASSES or isinstance(module, (GranQQAT, GranQReference)):
        return True
    if isinstance(module, HOST_LAYER_CLASSES):
        _warn_left_in_float(type(module), fqn)
    return False


_WARNED_CLASSES = set()


def _warn_left_in_float(cls: type, fqn: str) -> None:
    if cls in _WARNED_CLASSES:
        return
    _WARNED_CLASSES.add(cls)
    base = host_layer_class(cls).__name__
    if cls.__name__.startswith("Lazy"):
        why = "run one forward pass first, which turns lazy layers into their plain class"
    elif cls.__name__.startswith("Parametrized"):
        why = "remove its parametrization (torch.nn.utils.parametrize.remove_parametrizations) first"
    else:
        why = "quantize_ swaps exact types only (e.g. nn.MultiheadAttention's out_proj is such a subclass)"
    warnings.warn(f"is_conv_or_linear: {cls.__name__} (first at '{fqn}'; a subclass of nn.{base}) is left in float: "
                  f"{why}",
                  stacklevel=3)


@register_quantize_module_handler(GranQQATConfig)
def _granq_qat_transform(module: nn.Module, config: GranQQATConfig) -> nn.Module:
    if config.step == "convert":
        if isinstance(module, GranQQAT):
            return module.to_reference() if config.target == "reference" else module.to_float()
        if isinstance(module, GranQReference) and config.target == "float":
            return module.to_float()
        return module
    if isinstance(module, GranQQAT):
        raise ValueError(f"{type(module).__name__} is already prepared for GranQ QAT; to convert it, "
                         "call quantize_(model, GranQQATConfig(step=\"convert\"), filter_fn=is_conv_or_linear)")
    if isinstance(module, GranQReference):
        raise ValueError(f"{type(module).__name__} is already converted (GranQ reference form); to train again, "
                         "first make it a plain layer: quantize_(model, GranQQATConfig(step=\"convert\", "
                         "target=\"float\"), filter_fn=is_conv_or_linear), then prepare")
    qat_class = QAT_CLASSES.get(type(module))
    if qat_class is None:
        names = ", ".join(float_class.__name__ for float_class in QAT_CLASSES)
        raise TypeError(f"GranQQATConfig swaps {names} (exact types), got {type(module).__name__}; "
                        "call quantize_(model, config, filter_fn=is_conv_or_linear)")
    return qat_class.from_float(module, config.scheme)
