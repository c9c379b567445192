"""GranQ for NVIDIA pytorch-quantization (2.1.3): ``pip install -e ".[nvidia]"`` (from the clone).

* :class:`GranQTensorQuantizer`: a ``TensorQuantizer`` doing GranQ's dynamic per-(sample,
  channel) asymmetric fake-quant (other granularities selectable), described by a
  :class:`GranQDescriptor` (or a ``QuantDescriptor``). Calibration leaves it dynamic.
* :func:`replace_input_quantizers`: put it into existing quant modules, optionally only where
  the input is a ReLU output (the paper's placement, found by data flow).
* :func:`initialize` / :func:`deactivate` / :func:`granq_quant_modules`: like
  ``quant_modules.initialize()``, ``torch.nn.Conv2d``/``Linear`` ... built meanwhile get GranQ
  input quantizers and per-channel weight quantizers.
* :func:`export_onnx`: ONNX export whose graph computes the ranges from its input.

The math is :mod:`granq_ao.functional`; nothing here re-implements it.
"""
import warnings as _warnings

try:
    with _warnings.catch_warnings():
        # pytorch-quantization 2.1.3 applies the deprecated torch.jit.script at import time.
        _warnings.simplefilter("ignore", FutureWarning)
        import pytorch_quantization as _pytorch_quantization  # noqa: F401
        from pytorch_quantization import nn as _quant_nn  # noqa: F401
except ImportError as _error:  # pragma: no cover - exercised by a test with the package hidden
    raise ImportError(
        "granq_ao.integrations.pytorch_quantization needs NVIDIA's pytorch-quantization 2.1.3 "
        f"({_error}). Install it from the granq_ao clone with:  pip install -e \".[nvidia]\""
    ) from _error

from ._quantizer import GranQCalibrationWarning, GranQDescriptor, GranQTensorQuantizer, as_granq_descriptor
from ._modules import (
    DEFAULT_PATCHED_MODULES,
    GRANQ_MODULES,
    GranQAdaptiveAvgPool2d,
    GranQAvgPool2d,
    GranQConv1d,
    GranQConv2d,
    GranQConv3d,
    GranQLinear,
    GranQMaxPool2d,
    deactivate,
    granq_quant_modules,
    initialize,
)
from ._onnx import OnnxMismatchWarning, baked_weight_quantizers, export_onnx
from ._placement import (
    DisabledTensorQuantizer,
    find_relu_fed_modules,
    load_quant_state_dict,
    quant_modules_with_input_quantizer,
    replace_input_quantizers,
)

__all__ = [
    "GranQDescriptor", "GranQTensorQuantizer", "GranQCalibrationWarning", "as_granq_descriptor",
    "GranQConv1d", "GranQConv2d", "GranQConv3d", "GranQLinear",
    "GranQAvgPool2d", "GranQAdaptiveAvgPool2d", "GranQMaxPool2d",
    "GRANQ_MODULES", "DEFAULT_PATCHED_MODULES", "initialize", "deactivate", "granq_quant_modules",
    "replace_input_quantizers", "find_relu_fed_modules", "quant_modules_with_input_quantizer",
    "load_quant_state_dict", "export_onnx", "baked_weight_quantizers", "DisabledTensorQuantizer",
    "OnnxMismatchWarning",
]
