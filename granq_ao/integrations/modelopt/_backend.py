"""The ``"granq"`` quant backend of NVIDIA Model Optimizer: GranQ's fake-quant for a ``TensorQuantizer``.

modelopt's ``TensorQuantizer._fake_quantize`` hands its input to the backend named by the
quantizer's ``backend`` attribute (``register_quant_backend(name, entrypoint)``). Ours reads the
quantizer's ``backend_extra_args`` (plain data, saved and restored with ``mto.modelopt_state``),
rebuilds the :class:`~granq_ao.config.GranQConfig` they describe and calls
:func:`granq_ao.functional.fake_quantize`, the one copy of the math::

    x_min, x_max = min / max of x over every dim but the kept ones     (from x itself)
    s = (x_max - x_min) / (2^b - 1),   z = round(-x_min / s)
    x_hat = (clamp(round(x / s + z), 0, 2^b - 1) - z) * s
    dL/dx = dL/dx_hat                                                  (straight-through)

Activations (``role="activation"``) keep (sample, channel) by default; weights
(``role="weight"``) keep the output channel (:meth:`GranQConfig.for_weight`). The quantizer's
own ``num_bits``/``axis``/``amax`` are not used: the ranges are computed from every input.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Mapping, Tuple

import torch
from modelopt.torch.quantization.nn.modules.tensor_quantizer import (
    is_registered_quant_backend,
    register_quant_backend,
)

from granq_ao import functional as F
from granq_ao.config import GranQConfig, check_choice
from granq_ao.diagnostics import module_label

__all__ = ["BACKEND", "ROLES", "backend_args", "config_from_args", "granq_backend", "register_backend",
           "is_granq_quantizer"]

#: The name GranQ's backend is registered under (``"backend": BACKEND`` in a quantizer cfg).
BACKEND = "granq"
ROLES = ("activation", "weight")
_KEYS = ("role", "bits", "granularity", "symmetric", "fused", "check_finite")


def backend_args(config: GranQConfig, role: str) -> Dict[str, Any]:
    """``backend_extra_args`` for ``config`` used as ``role`` (plain data: JSON/YAML-serializable)."""
    check_choice(role, ROLES, "role")
    if not isinstance(config, GranQConfig):
        raise TypeError(f"expected a GranQConfig, got {type(config).__name__}")
    return {"role": role, "bits": config.bits, "granularity": config.name, "symmetric": config.symmetric,
            "fused": config.fused, "check_finite": config.check_finite}


def config_from_args(args: Mapping[str, Any]) -> GranQConfig:
    """The :class:`GranQConfig` that :func:`backend_args` wrote (validated there; cached)."""
    if not isinstance(args, Mapping):
        raise TypeError(f"backend_extra_args must be a mapping, got {type(args).__name__}")
    unknown = sorted(set(args) - set(_KEYS))
    missing = [key for key in ("role", "bits") if key not in args]
    if unknown or missing:
        raise ValueError(f"GranQ backend_extra_args take {', '.join(_KEYS)} (role and bits required); "
                         f"unknown {unknown}, missing {missing}")
    try:
        return _cached_config(tuple(sorted(args.items())))
    except TypeError:  # an unhashable value: validate uncached for the clear error
        return _build_config(dict(args))


@functools.lru_cache(maxsize=256)
def _cached_config(items: Tuple[Tuple[str, Any], ...]) -> GranQConfig:
    return _build_config(dict(items))


def _build_config(args: Dict[str, Any]) -> GranQConfig:
    role = check_choice(args.pop("role"), ROLES, "role")
    bits = args.pop("bits")
    if role == "activation":
        return GranQConfig.for_activation(bits, args.pop("granularity", "granq"), **args)
    return GranQConfig.for_weight(bits, args.pop("granularity", "channel"), **args)


def granq_backend(inputs: torch.Tensor, quantizer: torch.nn.Module) -> torch.Tensor:
    """The backend entrypoint: GranQ fake-quant of ``inputs`` as ``quantizer``'s
    ``backend_extra_args`` describe. Errors (bad options, NaN/inf -> ``NonFiniteInputError``,
    integer or rank-1 inputs) keep their type and name the quantizer's place in the model."""
    try:
        config = config_from_args(quantizer.backend_extra_args)
        # Under an exporting tracer granq_ao.functional records its eager ops (ReduceMin/ReduceMax,
        # Div, Round, Clip, ...), so an exported graph computes the ranges from its input.
        return F.fake_quantize(inputs, config)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{module_label(quantizer)}: {error}") from None


def is_granq_quantizer(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a modelopt quantizer that runs the GranQ backend (enabled or not)."""
    return getattr(module, "backend", None) == BACKEND


def register_backend() -> None:
    """Register :func:`granq_backend` as ``BACKEND`` (done on import of the package; a second
    call does nothing)."""
    if not is_registered_quant_backend(BACKEND):
        register_quant_backend(BACKEND, granq_backend)
