"""granq_ao: GranQ per-(sample, channel) fake-quantization for PyTorch QAT toolchains.

    from granq_ao import get_granq_qat_qconfig_mapping, prepare_qat_fx
    qat = prepare_qat_fx(model.train(), get_granq_qat_qconfig_mapping(3, 3), example_inputs)
"""
from . import functional
from .convert import convert_to_reference_fx
from .fake_quantize import GranQFakeQuantize
from .functional import NonFiniteInputError, fake_quantize
from .granularity import PerChannel, PerSampleChannel, PerTensor, as_granularity
from .observer import GranQObserver
from .placement import apply_paper_placement, count_activation_fake_quant_calls
from .prepare import prepare_qat_fx
from .qconfig import GranQQConfigMapping, get_granq_qat_qconfig_mapping, get_granq_qconfig

__version__ = "0.1.0"

__all__ = [
    "functional", "fake_quantize", "NonFiniteInputError", "GranQFakeQuantize", "GranQObserver",
    "PerChannel", "PerSampleChannel", "PerTensor", "as_granularity", "apply_paper_placement",
    "count_activation_fake_quant_calls",
    "prepare_qat_fx", "GranQQConfigMapping", "get_granq_qat_qconfig_mapping", "get_granq_qconfig",
    "convert_to_reference_fx",
]
