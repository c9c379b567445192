"""Put GranQ quantizers into existing pytorch-quantization models.

``replace_input_quantizers`` swaps the ``_input_quantizer`` of quant modules (``QuantConv2d``,
``QuantLinear``, ``QuantAvgPool2d`` ...) for :class:`GranQTensorQuantizer`; with
``placement="paper"`` (or ``only_after_relu=True``) only those whose input is a ReLU output (the
paper's placement); with ``placement="inputs"`` only the conv/linear quant modules (every
conv/linear input, as TensorRT quantizes; pooling inputs are left to ``disable_others``).
pytorch-quantization quantizes a layer's input inside the layer: a value read by two layers is
fake-quantized by each (the same numbers: GranQ's ranges come from the value).

Which inputs are ReLU outputs is found by *data flow*, not by module order
(:func:`granq_ao.relu.find_relu_fed_modules`, shared with the other input-quantizing
adapters): one forward pass on ``example_inputs`` runs under a ``TorchFunctionMode`` that
remembers every tensor returned by ``relu`` / ``relu_`` / ``F.relu`` / ``F.relu6`` /
``F.hardtanh(min_val=0)`` (modules and functional calls alike, in-place or not), and a forward
pre-hook on each quant module checks whether the tensor it receives is one of them. A tensor
changed in place after its ReLU (for example ``out += identity``) stops counting. Reshapes,
pooling or any other op in between make a new tensor, which does not count either: the
quantizer must see the ReLU output itself.
This works where ``torch.fx`` tracing fails (data-dependent Python control flow) and, unlike
module-order heuristics, sees residual adds and functional ReLUs.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional

import torch
from pytorch_quantization.nn import TensorQuantizer

from granq_ao import relu
from granq_ao.config import PLACEMENTS, check_choice

from ._quantizer import GranQTensorQuantizer, as_granq_descriptor

# pytorch-quantization's QuantConvNd/QuantLinear (and the GranQ ones) subclass these
_CONV_OR_LINEAR = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)

__all__ = ["quant_modules_with_input_quantizer", "find_relu_fed_modules", "replace_input_quantizers",
           "load_quant_state_dict", "DisabledTensorQuantizer"]


class DisabledTensorQuantizer(TensorQuantizer):
    """pytorch-quantization's ``TensorQuantizer`` as ``replace_input_quantizers(...,
    disable_others=True)`` leaves it: disabled (its input stays float, as in the paper).

    Disabled, its calibrator never sees a tensor, so pytorch-quantization's usual
    ``compute_amax`` step (``load_calib_amax()`` on every quantizer that has a calibrator) raised
    "Calibrator returned None". Here ``load_calib_amax`` leaves a disabled quantizer whose
    calibrator has seen nothing as it is (no amax, float). Everything else is
    ``TensorQuantizer``'s: ``enable()`` turns it back on and it calibrates as usual.
    """

    def load_calib_amax(self, *args: Any, **kwargs: Any) -> None:
        if self._disabled and not _calibrator_has_data(self._calibrator):
            return
        super().load_calib_amax(*args, **kwargs)


def _calibrator_has_data(calibrator: Any) -> bool:
    """Whether a pytorch-quantization calibrator collected anything (max: ``_calib_amax``,
    histogram: ``_calib_hist``)."""
    return any(getattr(calibrator, name, None) is not None for name in ("_calib_amax", "_calib_hist"))


def quant_modules_with_input_quantizer(model: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    """``{name: module}`` for every submodule with a single ``_input_quantizer``
    (pytorch-quantization's QuantConv*/QuantLinear/pooling and the GranQ modules)."""
    return {name: module for name, module in model.named_modules()
            if isinstance(getattr(module, "_input_quantizer", None), TensorQuantizer)}


def find_relu_fed_modules(model: torch.nn.Module, example_inputs: Any,
                          candidates: Optional[Dict[str, torch.nn.Module]] = None) -> List[str]:
    """Names of the modules (default: those with an input quantizer) whose input, on every call
    during one forward pass on ``example_inputs``, is a ReLU output itself
    (:func:`granq_ao.relu.find_relu_fed_modules`).

    The pass runs in eval mode under ``torch.no_grad()`` with every ``TensorQuantizer``
    disabled; training flags and quantizer states are restored after (BatchNorm statistics
    and calibrators are left untouched). Modules the pass never calls are not listed.
    """
    if candidates is None:
        candidates = quant_modules_with_input_quantizer(model)
    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
    disabled = [q._disabled for q in quantizers]
    try:
        for quantizer in quantizers:
            quantizer._disabled = True
        return relu.find_relu_fed_modules(model, example_inputs, candidates)
    finally:
        for quantizer, state in zip(quantizers, disabled):
            quantizer._disabled = state


def _resolve_placement(placement: Optional[str], only_after_relu: bool) -> bool:
    """``only_after_relu`` as ``placement`` says (``"paper"``), refusing a contradiction."""
    if placement is None:
        return only_after_relu
    check_choice(placement, PLACEMENTS, "placement")
    if only_after_relu and placement != "paper":
        raise ValueError(f"only_after_relu=True is the 'paper' placement; got placement={placement!r}")
    return placement == "paper"


def _candidates(quant_modules: Dict[str, torch.nn.Module], module_filter, placement: Optional[str]):
    """The quant modules ``module_filter`` keeps; with ``"inputs"`` the conv/linear ones only."""
    candidates = quant_modules
    if module_filter is not None:
        candidates = {name: module for name, module in quant_modules.items() if module_filter(name, module)}
    if placement == "inputs":
        candidates = {name: module for name, module in candidates.items() if isinstance(module, _CONV_OR_LINEAR)}
    return candidates


def replace_input_quantizers(model: torch.nn.Module, quant_desc: Any = None, *,
                             only_after_relu: bool = False, example_inputs: Any = None,
                             disable_others: bool = False,
                             module_filter: Optional[Callable[[str, torch.nn.Module], bool]] = None,
                             placement: Optional[str] = None) -> List[str]:
    """Give quant modules of ``model`` a :class:`GranQTensorQuantizer` as input quantizer.

    Args:
        model: a model holding pytorch-quantization quant modules (e.g. built after
            ``pytorch_quantization.quant_modules.initialize()``).
        quant_desc: the GranQ descriptor (``GranQDescriptor``, ``QuantDescriptor`` or dict;
            default 4-bit GranQ). Each module gets its own quantizer.
        only_after_relu: only modules whose input is a ReLU output (the paper's placement);
            needs ``example_inputs`` (see :func:`find_relu_fed_modules`).
        example_inputs: a tensor or tuple of forward arguments for the data-flow pass.
        disable_others: disable the input quantizers of the quant modules not replaced (the
            paper leaves the image and the pooled classifier input in float); they become
            :class:`DisabledTensorQuantizer` (pytorch-quantization's usual calibration loop
            leaves them float instead of failing on their empty calibrators).
        module_filter: optional ``(name, module) -> bool`` to narrow the candidates further.
        placement: one of ``granq_ao.config.PLACEMENTS``: ``"all"`` (every quant module),
            ``"paper"`` (= ``only_after_relu=True``) or ``"inputs"`` (conv/linear quant modules
            only). Default: ``"paper"`` if ``only_after_relu`` else ``"all"``.

    Returns the names of the modules whose input quantizer was replaced, in model order.
    """
    desc = as_granq_descriptor(quant_desc)
    only_after_relu = _resolve_placement(placement, only_after_relu)
    quant_modules = quant_modules_with_input_quantizer(model)
    candidates = _candidates(quant_modules, module_filter, placement)
    if only_after_relu:
        if example_inputs is None:
            raise ValueError("only_after_relu=True needs example_inputs to follow the data flow")
        selected = set(find_relu_fed_modules(model, example_inputs, candidates))
        if candidates and not selected:
            warnings.warn(
                "only_after_relu=True found no quant module fed by a ReLU/ReLU6 output: no input "
                "quantizer was replaced (the paper placement quantizes ReLU outputs only). Use "
                "only_after_relu=False to quantize every quant module's input.", UserWarning, stacklevel=2)
    else:
        selected = set(candidates)
    replaced = []
    for name, module in quant_modules.items():
        if name in selected:
            quantizer = GranQTensorQuantizer(desc)
            quantizer._granq_location = f"{name}._input_quantizer" if name else "_input_quantizer"
            module._input_quantizer = quantizer  # holds no tensors: nothing to move to a device
            replaced.append(name)
        elif disable_others:
            quantizer = module._input_quantizer
            quantizer.disable()
            if type(quantizer) is TensorQuantizer:
                quantizer.__class__ = DisabledTensorQuantizer  # same state, calibration-loop safe
    return replaced


def load_quant_state_dict(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool = True):
    """``model.load_state_dict`` that also works on CPU-only hosts when the checkpoint holds
    calibrated ``_amax`` buffers for pytorch-quantization's own quantizers.

    pytorch-quantization 2.1.3 creates a missing ``_amax`` buffer with ``.cuda()`` while
    loading; here the buffer is created first on the quantizer's device, so its loader only
    copies into it. GranQ quantizers drop ``_amax`` themselves (their ranges are dynamic).
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer) and not isinstance(module, GranQTensorQuantizer):
            key = f"{name}._amax" if name else "_amax"
            if key in state_dict and "_amax" not in module._buffers:
                module.register_buffer("_amax", torch.empty_like(state_dict[key], device=device))
    return model.load_state_dict(state_dict, strict=strict)
