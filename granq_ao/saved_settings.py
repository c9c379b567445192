"""The settings that shape a quantizer's numbers, saved with its ``state_dict`` and checked on load.

A fake-quant module of any integration saves, as its ``_extra_state``, one int64 tensor::

    [bits, symmetric, granularity, axis, quant_min, quant_max]

(``granularity`` = index in :data:`GRANULARITY_CODES`; ``granq_iterative`` saves as ``granq``: the
same ranges); an operand left in float (``None``) saves as ``[-1] * 6``, and a module with several
quantizers (a reference layer: input and weight) saves one row each. Loading a state_dict saved from other settings (a 4-bit checkpoint into an 8-bit
model) is then reported by :func:`settings_mismatch` instead of silently producing other numbers;
state_dicts saved before settings were saved load as before. Torch-only; every integration may use it.
"""
from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional, Sequence, Union

import torch

from .config import GranQConfig

__all__ = ["GRANULARITY_CODES", "settings_tensor", "describe_settings", "settings_mismatch", "load_checking_settings"]

GRANULARITY_CODES = ("granq", "channel", "tensor", "kernel")


Settings = Union[None, GranQConfig, Sequence[Optional[GranQConfig]]]
FLOAT_ROW = (-1,) * 6


def settings_tensor(config: Settings) -> torch.Tensor:
    """``[bits, symmetric, granularity, axis, quant_min, quant_max]`` of ``config`` (int64, CPU);
    ``[-1] * 6`` for ``None`` (float); one row per config for a sequence of them."""
    if isinstance(config, (list, tuple)):
        return torch.stack([settings_tensor(item) for item in config])
    if config is None:
        return torch.tensor(FLOAT_ROW, dtype=torch.int64)
    name = "granq" if config.name == "granq_iterative" else config.name
    axis = getattr(config.granularity, "axis", config.axis)
    return torch.tensor([config.bits, int(config.symmetric), GRANULARITY_CODES.index(name), axis,
                         config.quant_min, config.quant_max], dtype=torch.int64)


def describe_settings(settings: torch.Tensor) -> str:
    """``4-bit asymmetric granq (axis 1, grid [0, 15])`` from a :func:`settings_tensor` (rows
    joined with ``; ``; a float row reads ``float``)."""
    if settings.dim() == 2:
        return "; ".join(describe_settings(row) for row in settings)
    values = [int(v) for v in settings.flatten().tolist()]
    if tuple(values) == FLOAT_ROW:
        return "float"
    if len(values) != 6 or not 0 <= values[2] < len(GRANULARITY_CODES):
        return f"unknown ({values})"
    bits, symmetric, granularity, axis, q_min, q_max = values
    return (f"{bits}-bit {'symmetric' if symmetric else 'asymmetric'} {GRANULARITY_CODES[granularity]} "
            f"(axis {axis}, grid [{q_min}, {q_max}])")


def settings_mismatch(saved: Any, config: Settings, where: str) -> Optional[str]:
    """The ``load_state_dict`` error message if ``saved`` (the state_dict's ``_extra_state``, or
    ``None`` when absent) was saved from settings other than ``config``'s; ``None`` if they agree."""
    if not isinstance(saved, torch.Tensor):
        return None
    current = settings_tensor(config)
    if saved.shape == current.shape and torch.equal(saved.cpu().to(torch.int64), current):
        return None
    return (f"{where}: the state_dict was saved from a {describe_settings(saved)} fake-quant, this one is "
            f"{describe_settings(current)}. Prepare the model with the settings it was trained with "
            "(bits, symmetric, granularity) before load_state_dict().")


def load_checking_settings(load: Callable[[], None], config: Settings, state_dict: Mapping[str, Any], prefix: str,
                           missing_keys: List[str], error_msgs: List[str], where: str,
                           keep_state_if_absent: bool = False) -> bool:
    """The body of a quantizer's ``_load_from_state_dict``: refuse (append the message to
    ``error_msgs``, return False) a state_dict saved from other settings; else ``load()`` (the
    host class's own loading) and forgive a missing ``_extra_state`` (a state_dict saved before
    settings were saved); return True. ``keep_state_if_absent``: a state_dict holding no key of
    this module at all (a float checkpoint loaded into a prepared model) leaves its state as it
    is instead of reporting its keys missing."""
    key = prefix + "_extra_state"
    problem = settings_mismatch(state_dict.get(key), config, where)
    if problem:
        error_msgs.append(problem)
        return False
    absent = keep_state_if_absent and not any(name.startswith(prefix) for name in state_dict)
    before = set(missing_keys)
    load()
    for name in [name for name in missing_keys if name not in before and name.startswith(prefix)]:
        if absent or name == key:
            missing_keys.remove(name)
    return True
