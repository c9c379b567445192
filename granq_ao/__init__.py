"""granq_ao: GranQ per-(sample, channel) fake-quantization for PyTorch QAT toolchains."""
from . import functional
from .functional import fake_quantize, NonFiniteInputError
from .granularity import PerChannel, PerSampleChannel, PerTensor, as_granularity

__version__ = "0.1.0"
