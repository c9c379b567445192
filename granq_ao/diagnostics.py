"""Where a module sits in the model that is running it: for error messages only."""
from __future__ import annotations

import sys
from typing import Optional, Tuple

import torch

__all__ = ["locate_in_caller", "module_label"]


def locate_in_caller(module: torch.nn.Module) -> Optional[Tuple[str, torch.nn.Module]]:
    """``(qualified name, owner)`` of ``module`` in the outermost module on the call stack that
    holds it (a shared instance: the first of its names), or None. Walks the stack's ``self``
    locals and their ``named_modules``: slow, so call it on error paths only."""
    found = None
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch.nn.Module) and owner is not module:
            name = next((name for name, held in owner.named_modules(remove_duplicate=False)
                         if held is module), None)
            if name is not None:
                found = (name, owner)
        frame = frame.f_back
    return found


def module_label(module: torch.nn.Module, known_name: str = "") -> str:
    """``ClassName 'path.in.model' (in OwnerClass)`` for an error message: ``known_name`` when the
    caller recorded it, else looked up on the call stack (:func:`locate_in_caller`); the class
    name alone when the module is found nowhere."""
    label = type(module).__name__
    if known_name:
        return f"{label} '{known_name}'"
    location = locate_in_caller(module)
    if location is None:
        return label
    name, owner = location
    return f"{label} '{name}' (in {type(owner).__name__})"
