"""Fixtures and helpers shared by the test files.

``prepare(model, example, **scheme_kwargs)``: ``granq_ao.prepare_qat_fx`` in train mode with
``get_granq_qat_qconfig_mapping(**scheme_kwargs)`` (eager backend unless ``fused`` is given);
test files import it (``from conftest import prepare``).

``load_script``: a script of this repository as a module, by its path from the repository root
(``load_script("recipes/zsq_cifar.py")``). A script inside a package (``benchmarks/``) is imported
by its dotted name (``benchmarks.fidelity``), so it shares ``benchmarks.harness`` with the other
scripts; any other script is executed once from its file under ``name`` (default: its stem) and
registered in ``sys.modules`` (dataclasses look their module up there).
"""
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from torch import nn

import granq_ao

REPO = Path(__file__).resolve().parents[1]


def import_script(relative_path: str, name: Optional[str] = None):
    path = REPO / relative_path
    if (path.parent / "__init__.py").is_file():
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        return importlib.import_module(".".join(Path(relative_path).with_suffix("").parts))
    name = name or path.stem
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def prepare(model: nn.Module, example: torch.Tensor, **kwargs) -> torch.fx.GraphModule:
    kwargs.setdefault("fused", "eager")
    return granq_ao.prepare_qat_fx(model.train(), granq_ao.get_granq_qat_qconfig_mapping(**kwargs), (example,))


@pytest.fixture(scope="session")
def load_script() -> Callable:
    """``load_script(relative_path, name=None)`` -> the script's module (see the module docstring)."""
    return import_script
