"""The one "is this value a ReLU/ReLU6 output?" predicate of granq_ao (non-negative by construction).

The paper and its official code quantize activations only where they come out of a ReLU or
ReLU6. Each toolchain sees those points in its own terms; all of them ask this module:

* a call ``func(*args, **kwargs)`` (Python functions, tensor methods, ATen ops of an exported
  graph): :func:`is_relu_call`: ``relu``/``relu_``/``relu6`` in any spelling, or ``hardtanh``
  with ``min_val == 0`` (how ``nn.ReLU6`` and exported ``relu6`` are written);
* a module: :func:`is_relu_module`: ``nn.ReLU``, ``nn.ReLU6``, and torch.ao's fused intrinsic
  modules that end in a ReLU (``ConvReLU2d``, ``ConvBnReLU2d``, ``LinearReLU``, ``BNReLU2d`` ...).
  ``LeakyReLU``/``PReLU``/``RReLU`` outputs are signed: not ReLU outputs.

Toolchains that quantize a module's *input* (pytorch-quantization, modelopt) need to know
which modules receive a ReLU output: :func:`find_relu_fed_modules` follows the data flow of
one forward pass (a ``TorchFunctionMode`` remembers the tensors that ReLU calls return; a
forward pre-hook on each candidate checks whether its input is one of them).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence

import torch
import torch.nn.functional as nn_functional
from torch.overrides import TorchFunctionMode

__all__ = ["is_relu_call", "is_relu_module", "find_relu_fed_modules", "RELU_METHOD_NAMES"]

RELU_METHOD_NAMES = frozenset({"relu", "relu_"})

_RELU_FUNCTIONS = {nn_functional.relu, nn_functional.relu_, nn_functional.relu6, torch.relu, torch.relu_,
                   torch.Tensor.relu, torch.Tensor.relu_}
_HARDTANH_FUNCTIONS = {nn_functional.hardtanh, nn_functional.hardtanh_}
_ATEN_RELU_PACKETS = ("relu", "relu_", "relu6")
_ATEN_HARDTANH_PACKETS = ("hardtanh", "hardtanh_")


def _aten_packet_name(func: Any) -> str:
    """``"relu"`` for ``torch.ops.aten.relu.default`` / ``torch.ops.aten.relu``, else ``""``."""
    packet = getattr(func, "overloadpacket", func)
    if isinstance(packet, torch._ops.OpOverloadPacket) and packet._qualified_op_name.startswith("aten::"):
        return packet._qualified_op_name[len("aten::"):]
    return ""


def is_relu_call(func: Any, args: Sequence[Any] = (), kwargs: Mapping[str, Any] = None) -> bool:
    """Whether ``func(*args, **kwargs)`` returns a ReLU/ReLU6 output (see the module docstring).
    ``func`` may be a Python callable or an ATen op (``torch.ops.aten.relu.default``)."""
    kwargs = kwargs or {}
    aten = _aten_packet_name(func)
    if func in _HARDTANH_FUNCTIONS or aten in _ATEN_HARDTANH_PACKETS:
        min_val = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
        return min_val == 0.0
    if aten:
        return aten in _ATEN_RELU_PACKETS
    return func in _RELU_FUNCTIONS


def is_relu_module(module: torch.nn.Module) -> bool:
    """Whether ``module``'s output is a ReLU/ReLU6 output (see the module docstring)."""
    if isinstance(module, (torch.nn.ReLU, torch.nn.ReLU6)):
        return True
    module_type = type(module)
    return (module_type.__module__.startswith("torch.ao.nn.intrinsic")
            and module_type.__name__.rstrip("123d").endswith("ReLU"))


class _ReluOutputTracker(TorchFunctionMode):
    """Remembers (and holds, so ids stay unique) every tensor a ReLU-like call returned."""

    def __init__(self) -> None:
        super().__init__()
        self.relu_outputs: Dict[int, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            if is_relu_call(func, args, kwargs):
                self.relu_outputs[id(out)] = out
            elif id(out) in self.relu_outputs and self.relu_outputs[id(out)] is out:
                del self.relu_outputs[id(out)]  # an in-place op changed a ReLU output
        return out

    def is_relu_output(self, tensor: Any) -> bool:
        return isinstance(tensor, torch.Tensor) and self.relu_outputs.get(id(tensor)) is tensor


def find_relu_fed_modules(model: torch.nn.Module, example_inputs: Any,
                          candidates: Mapping[str, torch.nn.Module]) -> List[str]:
    """Names (in ``candidates`` order) of the ``candidates`` whose first input, on every call
    during one forward pass ``model(*example_inputs)``, is a ReLU/ReLU6 output itself.

    Data flow, not module order: a tensor returned by ``relu``/``relu_``/``F.relu6``/
    ``hardtanh(min_val=0)`` (modules and functional calls, in place or not) counts; changed in
    place afterwards (``out += identity``) it stops counting; anything computed from it
    (pooling, flatten, ...) does not count. Works where ``torch.fx`` tracing fails.

    ``example_inputs``: a tensor or a tuple of forward arguments. The pass runs in eval mode
    under ``torch.no_grad()``; training flags are restored after. Toolchain quantizers are the
    caller's business (switch them off around the call if they must not run). Candidates the
    pass never calls are not listed.
    """
    fed_by_relu: Dict[str, List[bool]] = {name: [] for name in candidates}
    tracker = _ReluOutputTracker()

    def make_hook(name: str):
        def hook(module, args):
            fed_by_relu[name].append(bool(args) and tracker.is_relu_output(args[0]))
        return hook

    handles = [module.register_forward_pre_hook(make_hook(name)) for name, module in candidates.items()]
    training = {module: module.training for module in model.modules()}
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        model.eval()
        with torch.no_grad(), tracker:
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in training.items():
            module.training = mode
        tracker.relu_outputs.clear()
    return [name for name, calls in fed_by_relu.items() if calls and all(calls)]
