"""Adapters from GranQ to other quantization toolchains.

Each adapter is a thin layer over :mod:`granq_ao.functional` (the math lives there only) and is
imported explicitly, so that ``import granq_ao`` never needs the toolchain:

* :mod:`granq_ao.integrations.pytorch_quantization`: NVIDIA pytorch-quantization 2.1.3
  (``pip install -e ".[nvidia]"``).
* :mod:`granq_ao.integrations.torchao`: torchao 0.18 PT2E QAT (``GranQQuantizer``) and a
  ``quantize_`` QAT config (``pip install -e ".[torchao]"``).
* :mod:`granq_ao.integrations.modelopt`: NVIDIA Model Optimizer 0.47, a ``"granq"`` quant backend
  and its ``mtq.quantize`` config (``pip install -e ".[modelopt]"``).
"""
