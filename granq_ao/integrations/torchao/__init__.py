"""GranQ for torchao (0.18): PT2E QAT and a ``quantize_`` config. ``pip install -e ".[torchao]"`` (from the clone).

* :class:`GranQQuantizer`: a PT2E ``Quantizer`` (``prepare_qat_pt2e`` / ``prepare_pt2e``) that
  puts GranQ fake-quants on conv/linear weights and activations (``all`` or ``paper`` placement);
* :class:`GranQPT2EFakeQuantize`: the fake-quant it inserts; ``convert_pt2e`` turns each into
  explicit dynamic ``torch.ops.granq_ao`` q/dq ops equal to the QAT model in eval;
* :func:`export_for_qat` / :func:`prepare_qat` / :func:`prepare_student`: export with a dynamic batch,
  prepare (routing conv-bn patterns around BatchNorm weights of exactly 0);
* :class:`GranQQATConfig`: ``torchao.quantization.quantize_`` QAT for eager conv / transposed conv /
  linear models (with ``filter_fn=is_conv_or_linear``), ``step="prepare"`` then ``step="convert"``
  (to reference modules with ``granq_ao`` q/dq ops, or back to plain layers);
* :func:`move_exported_model_to_train` / :func:`move_exported_model_to_eval`: torchao's, keeping
  each dropout's probability (torchao's set every dropout to p = 0.5);
* :func:`granq_fake_quant_calls`: which fake-quants a prepared graph calls (weights/activations);
* :data:`STUDENT`: the zero-shot student protocol (PT2E graph, frozen BN, its quantizers).

The math is :mod:`granq_ao.functional`; the options are :class:`granq_ao.config.GranQScheme`.
"""
try:
    import torchao as _torchao  # noqa: F401
    from torchao.quantization.pt2e import FakeQuantizeBase as _FakeQuantizeBase  # noqa: F401
except ImportError as _error:  # pragma: no cover - exercised only without torchao
    raise ImportError(
        f"granq_ao.integrations.torchao needs torchao 0.18 ({_error}). Install it from the granq_ao "
        "clone with:  pip install -e \".[torchao]\"") from _error

from .count import granq_fake_quant_calls
from .fake_quantize import GranQPT2EFakeQuantize
from .prepare import check_deterministic_eval_form, export_for_qat, prepare_qat, prepare_student
from .zero_gamma import route_zero_gamma_conv_bn
from .qat_config import GranQQATConfig, is_conv_or_linear
from .qat_modules import (GranQQAT, GranQQATConv, GranQQATConv1d, GranQQATConv2d, GranQQATConv3d, GranQQATConvTranspose,
                          GranQQATConvTranspose1d, GranQQATConvTranspose2d, GranQQATConvTranspose3d, GranQQATLinear)
from .reference_modules import (GranQReference, GranQReferenceConv1d, GranQReferenceConv2d, GranQReferenceConv3d,
                                GranQReferenceConvTranspose1d, GranQReferenceConvTranspose2d,
                                GranQReferenceConvTranspose3d, GranQReferenceLinear)
from .quantizer import GranQQuantizer
from .specs import granq_spec
from .student import STUDENT, PT2EStudent
from .train_eval import move_exported_model_to_eval, move_exported_model_to_train

__all__ = [
    "GranQQuantizer", "GranQPT2EFakeQuantize", "granq_spec", "export_for_qat", "check_deterministic_eval_form",
    "prepare_qat", "prepare_student", "route_zero_gamma_conv_bn",
    "GranQQATConfig", "is_conv_or_linear", "granq_fake_quant_calls", "STUDENT", "PT2EStudent",
    "move_exported_model_to_train", "move_exported_model_to_eval",
    "GranQQAT", "GranQQATConv", "GranQQATConv1d", "GranQQATConv2d", "GranQQATConv3d", "GranQQATConvTranspose",
    "GranQQATConvTranspose1d", "GranQQATConvTranspose2d", "GranQQATConvTranspose3d", "GranQQATLinear",
    "GranQReference", "GranQReferenceConv1d", "GranQReferenceConv2d", "GranQReferenceConv3d",
    "GranQReferenceConvTranspose1d", "GranQReferenceConvTranspose2d", "GranQReferenceConvTranspose3d",
    "GranQReferenceLinear",
]
