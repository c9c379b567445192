"""What every benchmark script prints first and writes last: a one-line run header (date, torch,
CPU or GPU, threads, the run's settings) and the JSON results file."""
from __future__ import annotations

import datetime
import json
import os

import torch

from fake_quant_latency import cpu_name


def run_header(settings: str) -> str:
    """``2026-11-30 09:50 UTC, torch 2.14.1, AMD EPYC, 2 threads, <settings>``."""
    return (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
            f"{cpu_name()}, {torch.get_num_threads()} threads, {settings}")


def write_json(path: str, payload: object) -> None:
    """``payload`` as indented JSON at ``path`` (folders created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=1)
