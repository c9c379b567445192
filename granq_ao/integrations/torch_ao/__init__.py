"""GranQ for torch.ao QAT (FX graph mode and eager mode); torch.ao ships with torch.

* :class:`GranQFakeQuantize` (a ``FakeQuantizeBase``) and :class:`GranQObserver`;
* :func:`get_granq_qconfig` / :func:`get_granq_qat_qconfig_mapping`: like torch.ao's defaults;
* :func:`prepare_qat_fx`: torch's, plus the paper's activation placement
  (:func:`apply_paper_placement`) or the conv/linear-input placement (:func:`apply_input_placement`,
  FX and eager); :func:`count_activation_fake_quant_calls` checks what was inserted;
* :func:`convert_to_reference_fx`: dynamic reference graphs equal to the QAT model in eval;
* :func:`convert_eager`: the same for eager-mode models (``torch.ao.quantization.prepare_qat``);
* :data:`STUDENT` / :func:`prepare_student`: the zero-shot student (frozen BN), its quantizers.

Everything here takes or builds :class:`granq_ao.config.GranQConfig` / ``GranQScheme`` and
computes with :mod:`granq_ao.functional`.
"""
from .convert import ConvBnEval, bake_weight_module, convert_to_reference_fx, weight_codes
from .dynamic_qdq import insert_dynamic_quant_dequant
from .eager import DynamicQuantDequant, convert_eager
from .fake_quantize import GranQFakeQuantize
from .input_placement import apply_input_placement, count_weighted_inputs
from .observer import GranQObserver
from .placement import activation_fake_quant_calls, apply_paper_placement, count_activation_fake_quant_calls
from .prepare import prepare_qat_fx
from .shared import GranQSharedFakeQuantize, share_input_qparams
from .zero_gamma import route_zero_gamma_batchnorm
from .qconfig import GranQQConfigMapping, PlacementWarning, get_granq_qat_qconfig_mapping, get_granq_qconfig
from .student import STUDENT, FXStudent, freeze_student_batchnorm, prepare_student

__all__ = [
    "GranQFakeQuantize", "GranQObserver", "GranQQConfigMapping", "PlacementWarning", "get_granq_qconfig",
    "get_granq_qat_qconfig_mapping", "prepare_qat_fx", "apply_paper_placement", "activation_fake_quant_calls",
    "count_activation_fake_quant_calls", "convert_to_reference_fx", "insert_dynamic_quant_dequant",
    "route_zero_gamma_batchnorm", "apply_input_placement", "count_weighted_inputs", "bake_weight_module",
    "weight_codes", "ConvBnEval", "convert_eager", "DynamicQuantDequant",
    "STUDENT", "FXStudent", "prepare_student", "freeze_student_batchnorm",
    "GranQSharedFakeQuantize", "share_input_qparams",
]
