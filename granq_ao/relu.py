"""The one "is this value a ReLU/ReLU6 output?" predicate of granq_ao (non-negative by construction).

The paper and its official code quantize activations only where they come out of a ReLU or
ReLU6. Each toolchain sees those points in its own terms; all of them ask this module:

* a call ``func(*args, **kwargs)`` (Python functions, tensor methods, ATen ops of an exported
  graph): :func:`is_relu_call`: ``relu``/``relu_``/``relu6`` in any spelling, or ``hardtanh``
  with ``min_val == 0`` (how ``nn.ReLU6`` and exported ``relu6`` are written);
* a module: :func:`is_relu_module`: ``nn.ReLU``, ``nn.ReLU6``, and torch.ao's fused intrinsic
  modules that end in a ReLU (``ConvReLU2d``, ``ConvBnReLU2d``, ``LinearReLU``, ``BNReLU2d`` ...).
  ``LeakyReLU``/``PReLU``/``RReLU`` outputs are signed: not ReLU outputs.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as nn_functional

__all__ = ["is_relu_call", "is_relu_module", "RELU_METHOD_NAMES"]

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
