"""granq_ao: GranQ per-(sample, channel) fake-quantization for PyTorch QAT toolchains.

    from granq_ao import get_granq_qat_qconfig_mapping, prepare_qat_fx
    qat = prepare_qat_fx(model.train(), get_granq_qat_qconfig_mapping(3, 3), example_inputs)

Layers (arrows point down): ``granq_ao.zsq`` (zero-shot QAT) -> ``granq_ao.integrations.<toolchain>``
-> the core (:mod:`~granq_ao.config`, :mod:`~granq_ao.functional`, :mod:`~granq_ao.granularity`,
:mod:`~granq_ao.relu`, :mod:`~granq_ao.diagnostics`). This front re-exports the core and the
torch.ao integration (torch.ao ships with torch); the other toolchains are imported explicitly
(``granq_ao.integrations.pytorch_quantization`` ...). See docs/ARCHITECTURE.md.
"""
from . import functional, ops
from .config import (ACT_GRANULARITIES, FUSED_MODES, PLACEMENTS, WEIGHT_GRANULARITIES, GranQConfig, GranQScheme,
                     as_granularity)
from .functional import NonFiniteInputError, fake_quantize
from .granularity import PerChannel, PerSampleChannel, PerTensor
from .integrations.torch_ao import (GranQFakeQuantize, GranQObserver, GranQQConfigMapping, PlacementWarning,
                                    apply_paper_placement, convert_eager, convert_to_reference_fx,
                                    count_activation_fake_quant_calls,
                                    get_granq_qat_qconfig_mapping, get_granq_qconfig, prepare_qat_fx)

__version__ = "0.2.0"

__all__ = [
    "functional", "ops", "fake_quantize", "NonFiniteInputError", "GranQConfig", "GranQScheme", "ACT_GRANULARITIES",
    "WEIGHT_GRANULARITIES", "PLACEMENTS", "FUSED_MODES", "PerChannel", "PerSampleChannel", "PerTensor",
    "as_granularity", "GranQFakeQuantize", "GranQObserver", "GranQQConfigMapping", "PlacementWarning",
    "apply_paper_placement", "count_activation_fake_quant_calls", "prepare_qat_fx", "get_granq_qat_qconfig_mapping",
    "get_granq_qconfig", "convert_to_reference_fx", "convert_eager",
]
