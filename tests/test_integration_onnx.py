"""ONNX export of a pytorch-quantization model with GranQ quantizers, run in onnxruntime."""
import io

import numpy as np
import pytest
import torch

gq = pytest.importorskip("granq_ao.integrations.pytorch_quantization")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from granq_ao.integrations.pytorch_quantization import GranQDescriptor, GranQTensorQuantizer  # noqa: E402

BITS = 4


@pytest.fixture(autouse=True)
def _eager_math(monkeypatch):
    monkeypatch.setenv("GRANQ_FUSED", "0")


pytestmark = pytest.mark.filterwarnings(
    "ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning",
    "ignore:The feature will be removed:DeprecationWarning")


def build_conv_model(symmetric):
    """conv -> relu -> conv with GranQ input quantizers (the image and the ReLU output),
    pytorch-quantization 4-bit per-channel weights, and a GranQ quantizer on the output
    (N, 4, 16, 16) so that the output lies on each (n, c) grid."""
    torch.manual_seed(0)
    desc = GranQDescriptor(num_bits=BITS, symmetric=symmetric, fused=False)
    with gq.granq_quant_modules(desc):
        body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                   torch.nn.Conv2d(8, 4, 3, padding=1))
    return torch.nn.Sequential(body, GranQTensorQuantizer(desc)).eval()


def build_linear_model():
    """conv -> relu -> flatten -> linear: the linear's GranQ input is rank 2 (one range per row)."""
    torch.manual_seed(0)
    desc = GranQDescriptor(num_bits=BITS, fused=False)
    with gq.granq_quant_modules(desc):
        body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.Flatten(),
                                   torch.nn.Linear(4 * 7 * 7, 32))
    return torch.nn.Sequential(body, GranQTensorQuantizer(desc)).eval()


def granq_step(x, symmetric):
    """Quantization step per (n, c) (rank > 2) or per row (rank 2): (max - min) / (2^b - 1),
    or max|x| / ((2^b - 1) / 2) in symmetric mode."""
    dims = tuple(range(2, x.dim())) if x.dim() > 2 else (1,)
    if symmetric:
        return x.abs().amax(dim=dims, keepdim=True) / ((2**BITS - 1) / 2)
    return (x.amax(dim=dims, keepdim=True) - x.amin(dim=dims, keepdim=True)) / (2**BITS - 1)


def check_graph_computes_ranges(data, n_quantizers):
    """One ReduceMin and one ReduceMax per GranQ quantizer, each reading a computed tensor
    (not an initializer or Constant), and a symbolic batch axis."""
    proto = onnx.load_from_string(data)
    onnx.checker.check_model(proto)
    constants = {init.name for init in proto.graph.initializer}
    constants |= {out for node in proto.graph.node if node.op_type == "Constant" for out in node.output}
    for op_type in ("ReduceMin", "ReduceMax"):
        sources = [node.input[0] for node in proto.graph.node if node.op_type == op_type]
        assert len(sources) == n_quantizers, op_type
        assert not constants.intersection(sources)
    assert {"Round", "Clip", "Div"} <= {node.op_type for node in proto.graph.node}
    assert not proto.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")


def compare_with_onnxruntime(model, data, input_shape, symmetric, max_flip_fraction):
    """Run at batch sizes other than the export's (and at 100x the scale: frozen ranges would
    clip); the output must match PyTorch within one quantization step everywhere, with a
    whole-step flip (a rounding tie decided differently after float reordering) on at most
    ``max_flip_fraction`` of the elements."""
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    final_inputs = []
    model[1].register_forward_hook(lambda module, inputs, output: final_inputs.append(inputs[0].detach()))
    torch.manual_seed(1)
    for batch, scale in ((5, 1.0), (3, 1.0), (7, 100.0)):
        x = torch.randn(batch, *input_shape) * scale
        expected = model(x).detach()
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        assert got.shape == expected.shape and got.shape[0] == batch
        step = granq_step(final_inputs[-1], symmetric)
        diff = (got - expected).abs()
        assert bool((diff <= step * (1 + 1e-4) + 1e-6).all()), float(diff.max())
        assert float((diff > step / 2).float().mean()) <= max_flip_fraction
        flat = got.flatten(2) if got.dim() > 2 else got.unsqueeze(1)
        assert max(flat[n, c].unique().numel() for n in range(batch) for c in range(flat.shape[1])) <= 2**BITS


@pytest.mark.parametrize("dynamo,symmetric", [
    (False, False), (False, True),
    pytest.param(True, False, marks=pytest.mark.slow),  # torch.export + onnxscript: ~10-20 s here
])
def test_conv_model_runs_in_onnxruntime_at_other_batch_sizes(dynamo, symmetric):
    model = build_conv_model(symmetric)
    weight_before = model[0][0].weight.detach().clone()
    data = gq.export_onnx(model, torch.randn(2, 3, 16, 16), dynamo=dynamo)
    assert torch.equal(model[0][0].weight, weight_before)  # baked weights were restored
    check_graph_computes_ranges(data, n_quantizers=3)
    compare_with_onnxruntime(model, data, (3, 16, 16), symmetric, max_flip_fraction=1e-3)


def test_rank2_linear_input_runs_in_onnxruntime():
    model = build_linear_model()
    data = gq.export_onnx(model, torch.randn(2, 3, 16, 16))
    check_graph_computes_ranges(data, n_quantizers=3)  # image, flat features, logits
    # 32 logits per row: a single flip is 3% of a row, so only "within one step" is meaningful.
    compare_with_onnxruntime(model, data, (3, 16, 16), symmetric=False, max_flip_fraction=1.0)


def test_export_writes_file_and_keeps_training_flag(tmp_path):
    model = build_conv_model(False).train()
    path = tmp_path / "granq.onnx"
    data = gq.export_onnx(model, torch.randn(2, 3, 12, 12), str(path))
    assert model.training
    assert path.read_bytes() == data
    buffer = io.BytesIO()
    gq.export_onnx(model, torch.randn(2, 3, 12, 12), buffer)
    onnx.checker.check_model(onnx.load_from_string(buffer.getvalue()))  # a valid model, not just bytes


def test_baked_weight_quantizers_restore_weights_and_states():
    model = build_conv_model(False)
    conv = model[0][0]
    weight = conv.weight.detach().clone()
    conv._weight_quantizer.num_bits = 2
    with gq.baked_weight_quantizers(model) as baked:
        assert baked == 2  # the two convs
        assert conv._weight_quantizer._disabled
        assert conv.weight.detach().unique().numel() <= conv.weight.shape[0] * 3  # 2-bit: 3 levels per channel
    assert torch.equal(conv.weight, weight) and not conv._weight_quantizer._disabled


def test_8bit_weights_as_qdq_with_use_fb_fake_quant():
    """pytorch-quantization's own export switch still works next to GranQ: its 8-bit weight
    quantizers become QuantizeLinear/DequantizeLinear pairs (zero zero-points, per channel)
    while the GranQ activations stay plain ops computing their ranges."""
    from pytorch_quantization import nn as quant_nn
    from pytorch_quantization.tensor_quant import QuantDescriptor

    torch.manual_seed(0)
    with gq.granq_quant_modules(GranQDescriptor(num_bits=BITS, symmetric=True, fused=False),
                                QuantDescriptor(num_bits=8, axis=(0,))):
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                    torch.nn.Conv2d(8, 4, 3)).eval()
    quant_nn.TensorQuantizer.use_fb_fake_quant = True
    try:
        data = gq.export_onnx(model, torch.randn(2, 3, 16, 16), bake_weights=False)
    finally:
        quant_nn.TensorQuantizer.use_fb_fake_quant = False
    proto = onnx.load_from_string(data)
    ops = [node.op_type for node in proto.graph.node]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 2
    assert ops.count("ReduceMin") == 2  # the two GranQ input quantizers
    constants = {init.name: onnx.numpy_helper.to_array(init) for init in proto.graph.initializer}
    constants.update({node.output[0]: onnx.numpy_helper.to_array(node.attribute[0].t)
                      for node in proto.graph.node if node.op_type == "Constant" and node.attribute[0].name == "value"})
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear":
            assert not constants[node.input[2]].any()  # zero-point 0
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 16, 16)
    got = session.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-4, atol=1e-4)
