"""Rebuild a module as another class of the same family, sharing its parameters.

``rebuild_as(cls, module)`` returns a new ``cls`` instance whose hyper-parameters (stride,
padding, ...) are ``module``'s and whose ``weight``/``bias`` are the same ``Parameter`` objects
(an optimizer built on them keeps working), in new parameter/buffer/sub-module dicts; the hook
dicts are the old module's own (hook handles keep working); the sub-modules and attributes named
in ``drop`` are left out. ``quantize_`` swaps modules in place,
so sharing is what the host expects (torchao's own ``FakeQuantizedLinear`` does the same).
"""
from __future__ import annotations

from typing import Iterable, Type, TypeVar

from torch import nn

__all__ = ["rebuild_as"]

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def rebuild_as(cls: Type[ModuleT], module: nn.Module, drop: Iterable[str] = ()) -> ModuleT:
    """A ``cls`` sharing ``module``'s state, without the sub-modules/attributes in ``drop``."""
    drop = set(drop)
    rebuilt = cls.__new__(cls)
    for key, value in module.__dict__.items():
        if key in drop:
            continue
        if "hook" in key:  # the same hook dicts: handles taken on the old module still remove them
            pass
        elif isinstance(value, dict):  # parameters, buffers, sub-modules (dict or OrderedDict)
            value = type(value)((name, item) for name, item in value.items() if name not in drop)
        elif isinstance(value, set):  # the non-persistent buffer names
            value = set(value) - drop
        rebuilt.__dict__[key] = value
    return rebuilt
