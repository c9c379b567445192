"""GranQQuantizer: a torchao PT2E ``Quantizer`` that annotates an exported graph with GranQ.

    quantizer = GranQQuantizer(weight_bits=4, act_bits=4, act_placement="paper")
    prepared = prepare_qat_pt2e(torch.export.export(model, example, dynamic_shapes=...).module(), quantizer)

What is annotated (``scheme = quantizer.scheme``; specs from :func:`.specs.granq_spec`):

* every conv1d/2d/3d and linear: its weight with ``scheme.weight`` (default per output channel,
  asymmetric min/max). Biases stay float. A conv followed by a batch norm is a conv-bn
  pattern that ``prepare_qat_pt2e`` rewrites into torchao's simulated fold
  (``w * gamma / sqrt(var + eps)`` fake-quantized, as torch.ao's ``ConvBn2d``);
* activations (``scheme.activation``, GranQ per (sample, channel) by default), by ``scheme.placement``:

  - ``"all"``: torch.ao FX's points (:mod:`.torch_ao_points`): the output of every
    ``conv/linear [-> bn] [-> relu]`` chain, residual add, mul, hardswish, dropout, ...;
    torch.ao's fixed 8-bit grid after sigmoid/hardsigmoid/tanh; the output of shared ops
    (ReLU6, pooling, flatten, view, ...) on its input's qparams (:mod:`.shared`); any
    activation input nothing quantized yet (the image). ResNet-20: 34 calls, the FX path's.
  - ``"paper"``: only the outputs of ReLU/ReLU6 (19 in ResNet-20), as the paper's code does.
    The input image, BN outputs, residual sums and logits stay float.
  - ``"inputs"``: only the input of every conv/linear (and transposed conv), as TensorRT and
    modelopt quantize (20 values in ResNet-20: a value read by several layers, e.g. a block
    input read by a shortcut conv and the block's first conv, is fake-quantized once, torchao's
    sharing of equal specs on one value). Works on any network (SiLU, GELU, LayerNorm ...).

Transposed convolutions: weights per output channel (groups included, as ``quantize_``;
:mod:`.transposed`), activations as a conv's. Reshapes are not annotated.

``prepare_qat_pt2e`` warns (:class:`~granq_ao.config.PlacementWarning`) when a placement
annotates no activation, naming how many conv/linear inputs ``"inputs"`` would quantize.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, Quantizer, SharedQuantizationSpec
from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

from granq_ao.config import GranQScheme, PlacementWarning, reject_options_with
from granq_ao.granularity import PerTensor

from .bn_literals import batch_norm_literals, restore_batch_norm_literals
from .patterns import (chain_tail, is_conv_or_linear_input_op, is_pool, is_relu_node, is_residual_add, is_weighted,
                       tensor_inputs)
from .shared import link_shared_fake_quants, shared_spec
from .specs import granq_spec
from .torch_ao_points import annotate_torch_ao_points, node_annotation
from .transposed import is_transposed_conv, transposed_groups
from .zero_gamma import zero_gamma_batch_norms

__all__ = ["GranQQuantizer"]


class GranQQuantizer(Quantizer):
    """GranQ for ``prepare_pt2e`` / ``prepare_qat_pt2e`` (see the module docstring).

    Args:
        scheme: a :class:`~granq_ao.config.GranQScheme`; or give its keyword options instead
            (``weight_bits``, ``act_bits``, ``act_granularity``, ``weight_granularity``,
            ``act_placement``, ``symmetric_weights``, ``symmetric_acts``, ``fused``,
            ``check_finite``: :meth:`GranQScheme.from_kwargs`, validated there); both at once is a
            ``ValueError`` naming the keywords.
        fold_bn: ``convert_pt2e`` folds each conv-BN into the conv's bias (no batch norm left;
            equal to QAT eval up to float rounding, which a low-bit quantizer downstream can turn
            into a step: :mod:`.fold_bn`). Default ``False``: QAT's arithmetic, bit-equal.
    """

    def __init__(self, scheme: Optional[GranQScheme] = None, fold_bn: bool = False, **options: Any) -> None:
        super().__init__()
        if scheme is None:
            scheme = GranQScheme.from_kwargs(**options)
        elif not isinstance(scheme, GranQScheme):
            raise TypeError(f"scheme must be a GranQScheme, got {scheme!r}")
        else:
            reject_options_with(scheme, options)
        self.scheme = scheme
        # set by granq_ao's prepare_qat, which routes conv-bn patterns around zero gammas
        self._routes_zero_gamma = False
        self.activation_spec = granq_spec(scheme.activation)
        self.fold_bn = bool(fold_bn)
        self.weight_spec = granq_spec(scheme.weight, fold_bn=self.fold_bn)
        self.shared_spec = shared_spec(scheme.activation)

    def transposed_weight_spec(self, node: Node):
        """The weight spec of transposed convolution ``node`` (per output channel, groups included)."""
        return granq_spec(self.scheme.weight, fold_bn=self.fold_bn, transposed_groups=transposed_groups(node))

    def transform_for_annotation(self, model: GraphModule) -> GraphModule:
        """Remember each batch norm's momentum and eps: torchao's conv-bn QAT fusion, which runs
        between this and :meth:`prepare_obs_or_fq_callback`, replaces them by its defaults."""
        self._batch_norm_literals = batch_norm_literals(model)
        return model

    def prepare_obs_or_fq_callback(self, model: GraphModule, edge_or_node_to_obs_or_fq) -> None:
        """Restore the batch norms' momentum and eps (:mod:`.bn_literals`); link each shared op's
        fake-quant to the fake-quant of its input (:mod:`.shared`)."""
        restore_batch_norm_literals(model, getattr(self, "_batch_norm_literals", {}))
        link_shared_fake_quants(model, edge_or_node_to_obs_or_fq)

    def annotate(self, model: GraphModule) -> GraphModule:
        if self.scheme.placement == "all":  # torch.ao FX's points, shared ops reusing qparams
            return annotate_torch_ao_points(model, self.activation_spec, self.weight_spec, self.shared_spec,
                                            self.transposed_weight_spec)
        if self.scheme.placement == "inputs":
            return self._annotate_inputs(model)
        paper = self.scheme.placement == "paper"
        for node in list(model.graph.nodes):
            if is_transposed_conv(node):  # weight per output channel (.transposed); activations as a conv's
                annotation = node_annotation(node)
                annotation.input_qspec_map[node.args[0]] = None if paper else self.activation_spec
                annotation.input_qspec_map[node.args[1]] = self.transposed_weight_spec(node)
                continue
            if is_weighted(node):
                annotation = node_annotation(node)
                # conv-bn QAT rewriting reads input_qspec_map as (input, weight[, bias]) in order
                annotation.input_qspec_map[node.args[0]] = None if paper else self.activation_spec
                annotation.input_qspec_map[node.args[1]] = self.weight_spec
                if not paper:
                    node_annotation(chain_tail(node)).output_qspec = self.activation_spec
            elif paper and is_relu_node(node):
                node_annotation(node).output_qspec = self.activation_spec
            elif not paper and is_residual_add(node):
                annotation = node_annotation(node)
                for value in tensor_inputs(node):
                    annotation.input_qspec_map[value] = self.activation_spec
                node_annotation(chain_tail(node)).output_qspec = self.activation_spec
            elif not paper and is_pool(node):
                annotation = node_annotation(node)
                annotation.input_qspec_map[node.args[0]] = self.activation_spec
                annotation.output_qspec = SharedQuantizationSpec((node.args[0], node))
        return model

    def _annotate_inputs(self, model: GraphModule) -> GraphModule:
        """``"inputs"``: the input of every conv/linear (weights as in the other placements)."""
        for node in list(model.graph.nodes):
            if not is_conv_or_linear_input_op(node):
                continue
            annotation = node_annotation(node)
            annotation.input_qspec_map[node.args[0]] = self.activation_spec
            if is_transposed_conv(node):  # weight per output channel (.transposed)
                annotation.input_qspec_map[node.args[1]] = self.transposed_weight_spec(node)
            elif is_weighted(node):
                annotation.input_qspec_map[node.args[1]] = self.weight_spec
        return model

    def _annotated_activations(self, model: GraphModule) -> list:
        """``(node, value)`` for every activation value annotated with the activation spec."""
        found = []
        for node in model.graph.nodes:
            annotation = node.meta.get(Q_ANNOTATION_KEY)
            if annotation is None:
                continue
            found += [(node, value) for value, spec in annotation.input_qspec_map.items()
                      if spec is self.activation_spec]
            if annotation.output_qspec is self.activation_spec:
                found.append((node, node))
        return found

    def validate(self, model: GraphModule) -> None:
        """Every annotated activation must have the rank its granularity needs (>= 2 unless per
        tensor): ``ValueError`` naming the node otherwise. A placement that annotates no
        activation warns (:class:`~granq_ao.config.PlacementWarning`). A conv followed by a
        BatchNorm whose weight holds an exact 0 is refused (``ValueError`` naming it): the conv-bn
        QAT pattern would divide by 0; :func:`granq_ao.integrations.torchao.prepare_qat` routes
        around it (:mod:`.zero_gamma`)."""
        if not self._routes_zero_gamma:
            zero = zero_gamma_batch_norms(model, after=is_weighted)
            if zero:
                raise ValueError(
                    f"GranQQuantizer: BatchNorm weight {zero[0]!r} (and {len(zero) - 1} more) holds exact zeros "
                    "(zero-initialised last BN, or a pruned channel): prepare_qat_pt2e's conv-bn QAT pattern "
                    "divides the conv output by gamma / sqrt(var + eps), which gives NaN there. Prepare with "
                    "granq_ao.integrations.torchao.prepare_qat(exported, quantizer) instead, which routes "
                    "those channels around the division")
        if not self._annotated_activations(model):
            inputs = {node.args[0] for node in model.graph.nodes if is_conv_or_linear_input_op(node)}
            warnings.warn(
                f"GranQQuantizer: act_placement={self.scheme.placement!r} annotated 0 activations, so this "
                f"model's activations stay float; act_placement='inputs' would quantize the {len(inputs)} "
                "conv/linear input(s).", PlacementWarning, stacklevel=2)
        if isinstance(self.scheme.activation.granularity, PerTensor):
            return
        for node in model.graph.nodes:
            annotation = node.meta.get(Q_ANNOTATION_KEY)
            if annotation is None:
                continue
            quantized = [value for value, spec in annotation.input_qspec_map.items() if spec is self.activation_spec]
            if annotation.output_qspec is self.activation_spec:
                quantized.append(node)
            for value in quantized:
                tensor = value.meta.get("val")
                if isinstance(tensor, torch.Tensor) and tensor.dim() < 2:
                    raise ValueError(
                        f"GranQQuantizer: '{value.name}' (rank {tensor.dim()}) cannot get "
                        f"{self.scheme.activation.name} ranges, which need rank >= 2 (batch, channels, ...)")
