"""torch.ao *eager* mode: converting a GranQ QAT model prepared with ``torch.ao.quantization.prepare_qat``.

torchvision's quantizable models and its QAT reference script use eager mode::

    model.fuse_model(is_qat=True)
    model.qconfig = granq_ao.get_granq_qconfig(4, 4)
    torch.ao.quantization.prepare_qat(model, inplace=True)
    # ... train ...
    ref = granq_ao.convert_eager(model.eval())          # not torch.ao.quantization.convert

torch's eager ``convert`` swaps every observed module for a quantized module that holds ONE
static output scale (``float(scale)``); GranQ computes one activation range per (sample, channel)
from every input, so that conversion cannot be made. :func:`convert_eager` builds the *dynamic
reference* model instead: a float model whose outputs equal the QAT model's in eval
(``torch.equal``), which pickles as a whole (``torch.save(model)``) and loads in a fresh process.

* QAT weighted modules (``weight_fake_quant``) become float modules holding the fake-quantized
  weights (:func:`~granq_ao.integrations.torch_ao.convert.bake_weight_module`; fused Conv-BN stays
  QAT's arithmetic, :class:`~granq_ao.integrations.torch_ao.convert.ConvBnEval`, unless
  ``fold_bn=True``).
* Each GranQ ``activation_post_process`` becomes a :class:`DynamicQuantDequant` under the same
  name, which calls the registered ops ``torch.ops.granq_ao.choose_qparams_dynamic`` ->
  ``quantize`` -> ``dequantize`` (see :mod:`granq_ao.ops`). torch.ao runs it from a forward
  hook (``_observer_forward_hook``: on the module's output; ``_observer_forward_pre_hook`` on
  its input when the observer is memoryless); that hook becomes this module's own hook at the
  same position, so the model does not depend on torch.ao's (deprecated) eager module to load.
  ``FloatFunctional`` (the residual ``add_relu``) calls its ``activation_post_process`` itself:
  only the module is replaced. A QAT module baked into a fused ``nn.Sequential``
  (``ConvReLU2d``, ``LinearReLU``: conv-relu without BN, or ``fold_bn=True``) gets its
  quantizer as last child instead, since a Sequential calls all its children (see
  :func:`_attach_to_sequential`). A fake-quant with ``fake_quant_enabled`` off, and a bare
  :class:`GranQObserver`, become ``nn.Identity`` (the QAT model passes values through there).
* ``QuantStub`` / ``DeQuantStub`` become ``nn.Identity`` (they are identities in the QAT model;
  the quant stub's fake-quant stays as its hook: the input image is quantized as in QAT).
* torch.ao's own activation fake-quants (e.g. the fixed-qparams ones of ``Hardsigmoid``) stay
  as they are, with torch's hooks: they compute what they computed in QAT (a moving-average
  observer among them keeps observing, as in QAT eval: ``model.apply(
  torch.ao.quantization.disable_observer)`` freezes it). Other forward hooks
  and pre-hooks of a replaced module are carried over, in order. ``qconfig`` attributes are
  removed, as torch's ``convert`` does.

``torch.ao.quantization.convert`` on a GranQ model is refused at once with a message naming
:func:`convert_eager` (see :func:`.eager_guard.refuse_torch_eager_convert`).
"""
from __future__ import annotations

import copy
import functools
import importlib
from typing import Optional, Tuple

import torch
from torch.ao.quantization.stubs import DeQuantStub, QuantStub
from torch.fx import GraphModule

import granq_ao.ops  # noqa: F401  (registers torch.ops.granq_ao)
from granq_ao.diagnostics import module_label
from granq_ao.functional import NonFiniteInputError
from granq_ao.qdq_graph import op_granularity

from .convert import bake_weight_module
from .dynamic_qdq import fake_quant_on
from .fake_quantize import GranQFakeQuantize
from .observer import GranQObserver

__all__ = ["DynamicQuantDequant", "convert_eager"]

# ----------------------------------------------------------------------------- the dynamic q/dq module
class DynamicQuantDequant(torch.nn.Module):
    """GranQ's dynamic quantize/dequantize of one activation, with the registered ops::

        scale, zero_point = torch.ops.granq_ao.choose_qparams_dynamic(x, bits, granularity, axis, symmetric, check_finite)
        x_q = torch.ops.granq_ao.quantize(x, scale, zero_point, bits, symmetric)   # uint8 / int8 codes
        x_hat = torch.ops.granq_ao.dequantize(x_q, scale, zero_point, x)           # x where s == 0

    ``x_hat`` equals the ``GranQFakeQuantize`` it replaces in eval, bit for bit. Holds no state
    (the options are plain attributes), so it pickles and loads anywhere granq_ao is importable.
    """

    def __init__(self, bits: int, granularity: str = "granq", axis: int = 1, symmetric: bool = False,
                 check_finite: bool = True) -> None:
        super().__init__()
        self.bits = int(bits)
        self.granularity = str(granularity)
        self.axis = int(axis)
        self.symmetric = bool(symmetric)
        self.check_finite = bool(check_finite)

    @classmethod
    def from_fake_quant(cls, fake_quant: GranQFakeQuantize) -> "DynamicQuantDequant":
        name, axis = op_granularity(fake_quant.config)
        return cls(fake_quant.bits, name, axis, fake_quant.symmetric, fake_quant.check_finite)

    def qparams(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` of ``x`` (float32, keepdim: one per (n, c) for ``granq``)."""
        return torch.ops.granq_ao.choose_qparams_dynamic(x, self.bits, self.granularity, self.axis,
                                                         self.symmetric, self.check_finite)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            scale, zero_point = self.qparams(x)
        except NonFiniteInputError as error:
            raise NonFiniteInputError(f"{module_label(self)}: {error}") from None
        codes = torch.ops.granq_ao.quantize(x, scale, zero_point, self.bits, self.symmetric)
        return torch.ops.granq_ao.dequantize(codes, scale, zero_point, x)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, granularity={self.granularity}, axis={self.axis}, "
                f"symmetric={self.symmetric}" + ("" if self.check_finite else ", check_finite=False"))


def _quantize_output_hook(module: torch.nn.Module, args, output):
    """Forward hook: the module's output through its ``activation_post_process``."""
    return module.activation_post_process(output)


def _quantize_input_pre_hook(module: torch.nn.Module, args):
    """Forward pre-hook: the module's first input through its ``activation_post_process``
    (torch.ao's memoryless-observer placement; like torch's hook, other inputs are dropped)."""
    return module.activation_post_process(args[0])


# ----------------------------------------------------------------------------- the converter
@functools.lru_cache(maxsize=1)
def _torch_observer_hooks() -> Tuple[Optional[object], Optional[object]]:
    """torch.ao's ``(_observer_forward_hook, _observer_forward_pre_hook)`` functions."""
    module = importlib.import_module("torch.ao.quantization.quantize")
    return getattr(module, "_observer_forward_hook", None), getattr(module, "_observer_forward_pre_hook", None)


def _replacement(quantizer: torch.nn.Module) -> Optional[torch.nn.Module]:
    """What a GranQ quantizer becomes (``None``: not GranQ's, keep it)."""
    if isinstance(quantizer, GranQFakeQuantize):
        return DynamicQuantDequant.from_fake_quant(quantizer) if fake_quant_on(quantizer) else torch.nn.Identity()
    if isinstance(quantizer, GranQObserver):  # records ranges only: an identity in forward
        return torch.nn.Identity()
    return None


def _is_torch_observer_hook(hook) -> bool:
    return any(torch_fn is not None and hook is torch_fn for torch_fn in _torch_observer_hooks())


def _copy_hooks(source: torch.nn.Module, target: torch.nn.Module, observer_hooks: bool = True) -> None:
    """Register ``source``'s forward pre-hooks and hooks on the new ``target``, in order, with
    their ``with_kwargs`` / ``always_call`` flags (torch's ``swap_module`` keeps them too);
    torch.ao's observer hooks only if ``observer_hooks``."""
    for handle_id, hook in source._forward_pre_hooks.items():
        if observer_hooks or not _is_torch_observer_hook(hook):
            target.register_forward_pre_hook(hook, with_kwargs=handle_id in source._forward_pre_hooks_with_kwargs)
    for handle_id, hook in source._forward_hooks.items():
        if observer_hooks or not _is_torch_observer_hook(hook):
            target.register_forward_hook(hook, with_kwargs=handle_id in source._forward_hooks_with_kwargs,
                                         always_call=handle_id in source._forward_hooks_always_called)


def _attach_to_sequential(source: torch.nn.Module, target: torch.nn.Sequential) -> None:
    """Give a new fused float module (``nn.Sequential``: ``ConvReLU2d``, ``LinearReLU``, ...)
    the quantizer that ``source`` (a QAT module, not a Sequential) ran from torch.ao's hook, so
    that it runs once. A Sequential calls every child in turn, an ``activation_post_process``
    child too, so the quantizer cannot be a child under a hook: on the output it is appended as
    the last child (no hook; it runs after the ReLU, before any other forward hook, as in QAT);
    on the input it goes to the first layer, with the pre-hook there (the Sequential's input is
    that layer's input; it then runs after the Sequential's own pre-hooks, if any)."""
    quantizer = source.activation_post_process
    quantizer = _replacement(quantizer) or quantizer
    torch_hook, torch_pre_hook = _torch_observer_hooks()
    if any(hook is torch_hook for hook in source._forward_hooks.values()):
        target.add_module("activation_post_process", quantizer)
    elif any(hook is torch_pre_hook for hook in source._forward_pre_hooks.values()):
        first = target[0]
        first.activation_post_process = quantizer
        first.register_forward_pre_hook(_quantize_input_pre_hook, prepend=True)


def _convert_activation(module: torch.nn.Module) -> None:
    """Replace ``module``'s GranQ ``activation_post_process`` and torch.ao's hook calling it."""
    new = _replacement(module._modules.get("activation_post_process"))
    if new is None:
        return
    module.activation_post_process = new
    torch_hook, torch_pre_hook = _torch_observer_hooks()
    for hooks, torch_fn, ours in ((module._forward_hooks, torch_hook, _quantize_output_hook),
                                  (module._forward_pre_hooks, torch_pre_hook, _quantize_input_pre_hook)):
        for handle_id, hook in list(hooks.items()):
            if torch_fn is not None and hook is torch_fn:
                hooks[handle_id] = ours  # same handle, same position (torch prepends it)


def _calls_all_children(module: torch.nn.Module) -> bool:
    """An ``nn.Sequential`` running ``Sequential.forward`` (torch's QAT fused modules are
    Sequentials too, but with a conv/linear forward of their own)."""
    return isinstance(module, torch.nn.Sequential) and type(module).forward is torch.nn.Sequential.forward


def _is_qat_weighted(module: torch.nn.Module) -> bool:
    return "weight_fake_quant" in module._modules and hasattr(module, "to_float")


def _convert_module(module: torch.nn.Module, fold_bn: bool) -> torch.nn.Module:
    """``module`` converted (in place where it stays, else its replacement)."""
    if isinstance(module, (GranQFakeQuantize, GranQObserver)):  # used as a layer of its own
        return _replacement(module)
    if _is_qat_weighted(module):
        new = bake_weight_module(module, fold_bn=fold_bn)
    elif isinstance(module, (QuantStub, DeQuantStub)):
        new = torch.nn.Identity()
    else:
        for name, child in list(module._modules.items()):
            if child is None or name == "activation_post_process":
                continue
            converted = _convert_module(child, fold_bn)
            if converted is not child:
                module._modules[name] = converted
        new = module
    if new is not module:
        new.train(module.training)
        has_quantizer = "activation_post_process" in module._modules
        sequential = _calls_all_children(new) and not _calls_all_children(module)
        _copy_hooks(module, new, observer_hooks=not sequential)
        if has_quantizer and sequential:
            _attach_to_sequential(module, new)
        elif has_quantizer:
            new.activation_post_process = module.activation_post_process
    _convert_activation(new)
    return new


def _has_granq(model: torch.nn.Module) -> bool:
    return any(isinstance(module, (GranQFakeQuantize, GranQObserver)) for module in model.modules())


def convert_eager(model: torch.nn.Module, inplace: bool = False, fold_bn: bool = False) -> torch.nn.Module:
    """The dynamic reference model of an eager-mode GranQ QAT model (``torch.ao.quantization.prepare_qat``).

    Returns a float model whose outputs equal the QAT model's in eval (``torch.equal``): weights
    fake-quantized once, activations quantized/dequantized per (sample, channel) at run time by
    :class:`DynamicQuantDequant` modules (see the module docstring). It keeps the QAT model's
    module names and its train/eval mode; call ``.eval()`` on it (or on the QAT model first), as
    for torch's ``convert``. ``torch.save(model)`` / ``torch.load(path, weights_only=False)``
    work as a whole (the loading process needs granq_ao installed; it is imported by unpickling).

    Args:
        model: the prepared (and trained) eager QAT model.
        inplace: convert ``model`` itself; by default a deep copy is converted and ``model`` (the
            QAT model) stays as it was, able to go on training.
        fold_bn: fold BatchNorm into conv/linear biases (torch's deployment form, equal to QAT up
            to float rounding) instead of keeping QAT's exact Conv-BN arithmetic.

    FX models (``prepare_qat_fx``): use :func:`granq_ao.convert_to_reference_fx`.
    """
    if isinstance(model, GraphModule):
        raise TypeError("convert_eager converts eager-mode models (torch.ao.quantization.prepare_qat); "
                        "for a prepare_qat_fx GraphModule use granq_ao.convert_to_reference_fx")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if not _has_granq(model):
        raise ValueError("the model holds no GranQ fake-quant: prepare it first (model.qconfig = "
                         "granq_ao.get_granq_qconfig(...); torch.ao.quantization.prepare_qat(model))")
    if not inplace:
        model = copy.deepcopy(model)
    model = _convert_module(model, fold_bn)
    for module in model.modules():
        if "qconfig" in module.__dict__:
            del module.qconfig
    return model
