"""What decides a run's float roundings on a CPU: the CPU model and the kernels torch picks for it.

oneDNN and ATen choose kernels by instruction set (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``
cap them) and split sums by thread count; other kernels or thread counts sum in another order, and
a low-bit rounding step turns a one-ulp difference into a whole step. A run resumed under another :func:`kernel_signature` continues
correctly but is not bit-identical to an uninterrupted run; the run record says so.
"""
from __future__ import annotations

import os
import platform
from typing import Dict

import torch

__all__ = ["cpu_name", "kernel_signature", "kernel_changes", "same_kernels"]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kernel_signature() -> Dict[str, str]:
    """``{"cpu", "aten_capability", "onednn_max_isa", "torch", "threads"}``: equal signatures run the
    same kernels. The thread count is part of it: CPU kernels split their sums by thread."""
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    return {"cpu": cpu_name(), "aten_capability": str(capability),
            "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "default"), "torch": str(torch.__version__),
            "threads": str(torch.get_num_threads())}


def kernel_changes(recorded: Dict[str, str], current: Dict[str, str]) -> Dict[str, tuple]:
    """``{key: (recorded value, current value)}`` where ``current`` differs from ``recorded``; a key
    that ``recorded`` lacks (a record written before that key existed) is not held against it."""
    return {key: (recorded[key], value) for key, value in current.items()
            if key in recorded and recorded[key] != value}


def same_kernels(recorded: Dict[str, str], current: Dict[str, str]) -> bool:
    """Whether ``current`` runs the kernels of ``recorded`` (no :func:`kernel_changes`)."""
    return not kernel_changes(recorded, current)
