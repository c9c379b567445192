"""GranQ for NVIDIA Model Optimizer (modelopt 0.47): ``pip install -e ".[modelopt]"`` (from the clone).

    import modelopt.torch.quantization as mtq
    from granq_ao.integrations.modelopt import granq_quant_cfg
    model = mtq.quantize(model, granq_quant_cfg(4, act_bits=4), forward_loop=None)

* :func:`granq_quant_cfg`: the ``mtq.quantize`` config (list form) of a GranQ scheme; every
  GranQ quantizer runs the ``"granq"`` quant backend (dynamic, asymmetric, per (sample,
  channel) for activations, per output channel for weights; straight-through gradient).
* :func:`prepare_student`: the zero-shot trainer's student (frozen BN, trainable parameters);
  :data:`STUDENT`: its student protocol (build, quantizers, counts, train/eval).
* :func:`export_onnx`: ONNX export whose graph computes the ranges from its input.

Importing this package registers the backend. modelopt restores (``mto.restore``,
``mto.restore_from_modelopt_state``) a quantizer's ``backend`` by name only, so
**import granq_ao.integrations.modelopt before restoring** a GranQ model (else its first
forward raises ``KeyError: "Quant backend 'granq' is not registered."``).

The math is :mod:`granq_ao.functional`; nothing here re-implements it.
"""
try:
    import modelopt.torch.quantization as _mtq  # noqa: F401
except ImportError as _error:  # pragma: no cover - exercised by a test with the package hidden
    raise ImportError(
        "granq_ao.integrations.modelopt needs NVIDIA Model Optimizer (nvidia-modelopt) "
        f"({_error}). Install it from the granq_ao clone with:  pip install -e \".[modelopt]\""
    ) from _error

from ._backend import BACKEND, backend_args, config_from_args, granq_backend, is_granq_quantizer, register_backend
from ._config import ACTIVATION_LAYERS, WEIGHT_LAYERS, granq_quant_cfg, relu_fed_layers
from ._onnx import export_onnx, granq_export_mode
from ._student import STUDENT, ModelOptStudent, freeze_batchnorm, prepare_student

register_backend()

__all__ = [
    "BACKEND", "granq_quant_cfg", "relu_fed_layers", "WEIGHT_LAYERS", "ACTIVATION_LAYERS", "backend_args",
    "config_from_args", "granq_backend", "is_granq_quantizer", "register_backend", "export_onnx",
    "granq_export_mode",
    "prepare_student", "freeze_batchnorm", "STUDENT", "ModelOptStudent",
]
