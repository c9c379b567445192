"""``act_placement="all"`` in PT2E: the activation quantize points of torch.ao FX, on an ATen graph.

torch.ao's native backend config (x86) sorts ops into three kinds, and the FX path with GranQ
(``get_granq_qat_qconfig_mapping``) follows it; :func:`annotate_torch_ao_points` writes the same
points as torchao annotations, so that PT2E and FX train the same model:

* ops whose output gets its own quantizer (``OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT``):
  conv/transposed conv/linear chains ``conv/linear [-> bn] [-> relu]`` (torch.ao fuses ReLU only: a ReLU6 or
  Hardtanh after them is a separate, shared op), residual ``add [-> relu]``, ``mul`` of two
  activations, hardswish, dropout, elu, leaky_relu, layer/group/instance norm, ``nn.Flatten``
  (a module, not ``torch.flatten``): GranQ on the output;
* fixed-qparams ops (sigmoid, hardsigmoid, tanh, softmax): torch.ao's fixed 8-bit grid on the
  output (the GranQ mapping keeps torch.ao's qconfig there): ``FixedQParamsQuantizationSpec``
  with scale 1/256, zero point 0 (tanh: 2/256, 128);
* shared ops (``OUTPUT_SHARE_OBSERVER_WITH_INPUT``: ReLU/ReLU6/Hardtanh/clamp, max/avg/adaptive
  pooling, ``torch.flatten``, view, mean, permute, ...): the output reuses the input's qparams
  (:mod:`.shared`).

Every op's activation input that nothing quantized yet (the model input, the output of an
unquantized op) gets GranQ on that edge, as torch.ao inserts an input observer. A value is
quantized once. ``cat``/``stack`` (torch.ao makes all inputs share one observer) and recurrent
layers are not annotated. ``reshape`` keeps torch.ao's ``ReuseInputObserver`` (no quantizer).
"""
from __future__ import annotations

from typing import Optional, Set

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e.quantizer import FixedQParamsQuantizationSpec, QuantizationAnnotation
from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

from .patterns import is_residual_add, is_weighted, reaches_placeholder, tensor_inputs
from .transposed import is_transposed_conv

__all__ = ["annotate_torch_ao_points", "OWN_OUTPUT_OPS", "FIXED_QPARAMS_OPS", "SHARED_OPS"]

_aten = torch.ops.aten


def _overloads(*names: str) -> frozenset:
    found = set()
    for name in names:
        packet = getattr(_aten, name, None)
        if packet is None:
            continue
        for overload in packet.overloads():
            found.add(getattr(packet, overload))
    return frozenset(found)


_BATCH_NORMS = _overloads("batch_norm", "_native_batch_norm_legit_no_training")
_RELUS = _overloads("relu", "relu_")
_MULS = _overloads("mul", "mul_")
OWN_OUTPUT_OPS = _overloads("hardswish", "hardswish_", "dropout", "dropout_", "elu", "elu_", "leaky_relu",
                            "leaky_relu_", "layer_norm", "group_norm", "instance_norm", "matmul")
FIXED_QPARAMS_OPS = {  # torch.ao's default fixed qparams: (scale, zero_point) on [0, 255]
    **{op: (1.0 / 256.0, 0) for op in _overloads("sigmoid", "sigmoid_", "hardsigmoid", "hardsigmoid_", "_softmax",
                                                 "softmax")},
    **{op: (2.0 / 256.0, 128) for op in _overloads("tanh", "tanh_")},
}
SHARED_OPS = _overloads(
    "relu", "relu_", "relu6", "relu6_", "hardtanh", "hardtanh_", "clamp", "clamp_", "max_pool1d", "max_pool2d",
    "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_avg_pool3d", "flatten", "view", "mean", "permute", "transpose", "squeeze", "squeeze_", "unsqueeze",
    "unsqueeze_", "contiguous", "detach", "narrow", "pixel_shuffle", "pixel_unshuffle", "repeat",
    "repeat_interleave", "upsample_nearest2d", "upsample_bilinear2d")


def node_annotation(node: Node) -> QuantizationAnnotation:
    """``node``'s torchao annotation (created empty when it has none), marked as annotated."""
    annotation = node.meta.get(Q_ANNOTATION_KEY)
    if annotation is None:
        annotation = node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation()
    annotation._annotated = True
    return annotation


def _is_call(node: Node, targets) -> bool:
    return node.op == "call_function" and node.target in targets


def _only_user(node: Node) -> Optional[Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _fused_tail(node: Node, batch_norm: bool) -> Node:
    """``node [-> bn] [-> relu]`` as torch.ao fuses it (each the only user of the one before)."""
    tail, user = node, _only_user(node)
    if batch_norm and user is not None and _is_call(user, _BATCH_NORMS) and user.args[0] is tail:
        tail, user = user, _only_user(user)
    if user is not None and _is_call(user, _RELUS) and user.args[0] is tail:
        tail = user
    return tail


def _is_activation(value) -> bool:
    tensor = value.meta.get("val") if isinstance(value, Node) else None
    return isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and reaches_placeholder(value)


def _is_module_flatten(node: Node) -> bool:
    """``nn.Flatten`` (own quantizer in torch.ao) rather than ``torch.flatten`` (shared)."""
    stack = node.meta.get("source_fn_stack") or []
    return bool(stack) and stack[-1][1] is torch.nn.Flatten


def annotate_torch_ao_points(model: GraphModule, activation_spec, weight_spec, shared_spec,
                             transposed_weight_spec=None) -> GraphModule:
    """Annotate ``model`` with torch.ao FX's activation points (module docstring); weights with
    ``weight_spec``, a transposed convolution's with ``transposed_weight_spec(node)``."""
    quantized: Set[Node] = set()
    fixed: Set[Node] = set()  # quantized on torch.ao's fixed grid: a shared op after them is left alone
    handled: Set[Node] = set()

    def quantize_inputs(node: Node, values) -> None:
        annotation = node_annotation(node)
        for value in values:
            if _is_activation(value) and value not in quantized:
                annotation.input_qspec_map[value] = activation_spec
                quantized.add(value)

    def quantize_output(node: Node, spec) -> None:
        node_annotation(node).output_qspec = spec
        quantized.add(node)

    for node in list(model.graph.nodes):
        if node.op != "call_function" or node in handled:
            continue
        transposed = is_transposed_conv(node)
        if is_weighted(node) or transposed:
            annotation = node_annotation(node)
            source = node.args[0]
            # conv-bn QAT rewriting reads input_qspec_map as (input, weight[, bias]) in order
            needs_input = _is_activation(source) and source not in quantized
            annotation.input_qspec_map[source] = activation_spec if needs_input else None
            if needs_input:
                quantized.add(source)
            annotation.input_qspec_map[node.args[1]] = transposed_weight_spec(node) if transposed else weight_spec
            tail = _fused_tail(node, batch_norm=True)
            handled.update(user for user in (tail,) if user is not node)
            quantize_output(tail, activation_spec)
        elif is_residual_add(node) or (_is_call(node, _MULS) and len(tensor_inputs(node)) == 2):
            quantize_inputs(node, tensor_inputs(node))
            tail = _fused_tail(node, batch_norm=False)
            handled.add(tail)
            quantize_output(tail, activation_spec)
        elif node.target in OWN_OUTPUT_OPS or (_is_call(node, _overloads("flatten")) and _is_module_flatten(node)):
            if _is_activation(node.args[0]):
                quantize_inputs(node, [node.args[0]])
                quantize_output(node, activation_spec)
        elif node.target in FIXED_QPARAMS_OPS:
            if _is_activation(node.args[0]):
                scale, zero_point = FIXED_QPARAMS_OPS[node.target]
                quantize_inputs(node, [node.args[0]])
                fixed.add(node)
                quantize_output(node, FixedQParamsQuantizationSpec(
                    dtype=torch.uint8, scale=scale, zero_point=zero_point, quant_min=0, quant_max=255,
                    qscheme=torch.per_tensor_affine))
        elif node.target in SHARED_OPS:
            if (_is_activation(node.args[0]) and node.args[0] not in fixed
                    and isinstance(node.meta.get("val"), torch.Tensor)):
                quantize_inputs(node, [node.args[0]])
                quantize_output(node, shared_spec)
    return model
