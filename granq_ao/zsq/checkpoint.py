"""Atomic files and RNG state for resumable runs.

A file is written to a temporary name in the same folder, flushed to disk, then moved over the
target with ``os.replace`` (atomic on POSIX and Windows): an interrupted write never leaves a
truncated checkpoint, the previous one stays valid.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict

import numpy as np
import torch

__all__ = ["atomic_write", "atomic_torch_save", "atomic_write_json", "load_checkpoint", "rng_state", "set_rng_state"]


def atomic_write(path: os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then ``os.replace`` it there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_torch_save(obj: Any, path: os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_json(obj: Any, path: os.PathLike) -> None:
    """JSON (indented, UTF-8) to ``path``, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda handle: handle.write(text), mode="w")


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """The checkpoint at ``path`` (weights only, on CPU); ``ValueError`` saying it is damaged when it
    cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = (str(error).splitlines() or [""])[0][:120]
        raise ValueError(
            f"{path} is damaged and cannot be read ({type(error).__name__}{': ' + reason if reason else ''}). "
            "Checkpoints are replaced atomically after each epoch and no older one is kept: this run cannot be "
            "resumed; start a new one with another --out") from None


def rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA when initialized) RNG states, in types that
    ``torch.load(..., weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
