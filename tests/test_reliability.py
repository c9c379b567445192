"""Hardening (issue 11): saved models that load, conversions that match QAT, bad input that fails
early with a message naming the problem and the fix. docs/RELIABILITY.md lists what each test
guarantees."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import granq_ao

ROOT = Path(__file__).resolve().parents[1]


def run_fresh(code: str) -> str:
    """Run ``code`` in a new interpreter that imports this checkout's granq_ao; its stdout."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               GRANQ_FUSED="eager")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def prepare(model: nn.Module, example: torch.Tensor, **kwargs) -> torch.fx.GraphModule:
    kwargs.setdefault("fused", "eager")
    return granq_ao.prepare_qat_fx(model.train(), granq_ao.get_granq_qat_qconfig_mapping(**kwargs), (example,))


class Mixed(nn.Module):
    """Conv-BN-ReLU (fused QAT module), sigmoid (torch.ao's fixed-qparams fake-quant), reshape
    (torch.ao's reuse-input observer), LayerNorm (torch.ao's weight qconfig), Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        y = torch.sigmoid(y).reshape(y.shape[0], 4, 36)[..., :6]
        return self.fc(self.norm(y))


def test_loaded_observer_records_its_first_batch():
    """A GranQObserver saved before any batch (empty per-channel buffers) and loaded by torch.load
    got buffers whose storage cannot be resized: its first batch raised "Trying to resize storage
    that is not resizable"; so did load_state_dict of another channel count into a loaded one."""
    import io

    buffer = io.BytesIO()
    torch.save(granq_ao.GranQObserver(bits=4), buffer)
    buffer.seek(0)
    observer = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 3, 4, 4)
    observer(x)
    assert torch.equal(observer.min_val, x.amin(dim=(0, 2, 3)))
    other = granq_ao.GranQObserver(bits=4)
    other(torch.randn(2, 5, 4, 4))
    observer.load_state_dict(other.state_dict())
    assert torch.equal(observer.max_val, other.max_val)
