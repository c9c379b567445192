"""GranQ inside pytorch-quantization's own workflows: its calibration loop after disable_others,
set_default_quant_desc_* with a GranQ descriptor, ONNX export that warns when onnxruntime differs.
docs/RELIABILITY.md."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn


def nvidia_calibrate(model, batches):
    """pytorch-quantization's documented calibration: collect_stats then compute_amax."""
    from pytorch_quantization import calib
    from pytorch_quantization import nn as quant_nn

    quantizers = [m for m in model.modules() if isinstance(m, quant_nn.TensorQuantizer)]
    for module in quantizers:
        if module._calibrator is not None:
            module.disable_quant()
            module.enable_calib()
        else:
            module.disable()
    with torch.no_grad():
        for x in batches:
            model(x)
    for module in quantizers:
        if module._calibrator is not None:
            module.enable_quant()
            module.disable_calib()
        else:
            module.enable()
    for module in quantizers:
        if module._calibrator is not None:
            if isinstance(module._calibrator, calib.MaxCalibrator):
                module.load_calib_amax()
            else:
                module.load_calib_amax("percentile", percentile=99.99)


def test_nvidia_compute_amax_after_disable_others():
    """After quant_modules.initialize() and replace_input_quantizers(..., disable_others=True) the
    usual compute_amax step died with "Calibrator returned None" on the disabled quantizers."""
    gq = pytest.importorskip("granq_ao.integrations.pytorch_quantization")
    from pytorch_quantization import quant_modules

    torch.manual_seed(0)
    quant_modules.initialize()
    try:
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(16, 2))
    finally:
        quant_modules.deactivate()
    replaced = gq.replace_input_quantizers(model, gq.GranQDescriptor(num_bits=4, fused=False), only_after_relu=True,
                                           example_inputs=torch.randn(1, 3, 6, 6), disable_others=True)
    assert replaced == ["2"]
    nvidia_calibrate(model, [torch.randn(4, 3, 6, 6)])
    for name in ("0", "4"):  # disabled: float, no amax, still disabled
        quantizer = getattr(model, name)._input_quantizer
        assert isinstance(quantizer, gq.DisabledTensorQuantizer) and quantizer._disabled
        assert "_amax" not in quantizer._buffers
        assert getattr(model, name)._weight_quantizer.amax is not None  # weights calibrated as usual
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(model[0]._input_quantizer(x), x)


def test_nvidia_set_default_quant_desc_with_granq_descriptor_names_the_fix():
    """QuantConv2d.set_default_quant_desc_input(GranQDescriptor(...)) failed with pytorch-quantization's
    "{} is not an instance of QuantDescriptor!"; NVIDIA's quant modules cannot hold GranQ
    quantizers, so the error now names the GranQ module and helpers to use."""
    gq = pytest.importorskip("granq_ao.integrations.pytorch_quantization")
    from pytorch_quantization import nn as quant_nn
    from pytorch_quantization.tensor_quant import QuantDescriptor

    with pytest.raises(TypeError, match=r"QuantConv2d.*GranQConv2d.set_default_quant_desc_input.*replace_input"):
        quant_nn.QuantConv2d.set_default_quant_desc_input(gq.GranQDescriptor(num_bits=4))
    with pytest.raises(TypeError, match=r"GranQMaxPool2d.set_default_quant_desc_input"):
        quant_nn.QuantMaxPool2d.set_default_quant_desc_input(gq.GranQDescriptor(num_bits=4))
    with pytest.raises(TypeError, match=r"GranQLinear.set_default_quant_desc_weight"):
        quant_nn.QuantLinear.set_default_quant_desc_weight(gq.GranQDescriptor(num_bits=4))
    before = quant_nn.QuantConv2d.default_quant_desc_input
    try:  # NVIDIA's own descriptors work as before, and the GranQ modules take GranQ's
        quant_nn.QuantConv2d.set_default_quant_desc_input(QuantDescriptor(num_bits=6))
        assert quant_nn.QuantConv2d(3, 4, 3)._input_quantizer.num_bits == 6
        with pytest.raises(ValueError, match="not an instance of QuantDescriptor"):
            quant_nn.QuantConv2d.set_default_quant_desc_input("8 bits")
    finally:
        quant_nn.QuantConv2d.default_quant_desc_input = before
    saved = gq.GranQConv2d.__dict__.get("default_quant_desc_input")
    try:
        gq.GranQConv2d.set_default_quant_desc_input(gq.GranQDescriptor(num_bits=3, fused=False))
        assert gq.GranQConv2d(3, 4, 3)._input_quantizer.num_bits == 3
    finally:
        if saved is None:
            del gq.GranQConv2d.default_quant_desc_input
        else:
            gq.GranQConv2d.default_quant_desc_input = saved


class ExportsDifferently(nn.Module):
    """Adds 0.01 only in the exported graph: a stand-in for a backend that rounds differently."""

    def forward(self, x):
        return x + 0.01 if torch.onnx.is_in_onnx_export() else x


def test_nvidia_onnx_export_warns_when_onnxruntime_differs_from_pytorch():
    """An export mixing NVIDIA's 8-bit quantizers with GranQ differed from PyTorch by 0.157 with no
    warning. export_onnx now runs the graph in onnxruntime on the example inputs and warns with the
    difference and its cause; a faithful export stays silent."""
    gq = pytest.importorskip("granq_ao.integrations.pytorch_quantization")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    with gq.granq_quant_modules(gq.GranQDescriptor(num_bits=4, fused=False)):
        conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gq.OnnxMismatchWarning)
        gq.export_onnx(conv, x)
    with pytest.warns(gq.OnnxMismatchWarning, match=r"differs from PyTorch's by up to 0.01.*not bit-exact"):
        gq.export_onnx(nn.Sequential(conv, ExportsDifferently()), x)
