"""What every benchmark script shares: the machine it ran on, the allocator setting, timers, the
torch.compile fallback counter, peak step memory, target checks and the report files.

Scripts import it as ``benchmarks.harness``: each script puts the repository root on ``sys.path``
(one line at its top), so ``python benchmarks/x.py`` and ``python -m benchmarks.x`` both work.

Timing: CPU calls are timed with ``time.perf_counter`` around each call; CUDA calls with a pair of
CUDA events per call, read after one final ``torch.cuda.synchronize``. Several candidates are
timed **interleaved** (one call of each per round), so a burst of load from other processes
hits all of them alike and their ratios stay honest on a shared machine.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import json
import logging
import os
import platform
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch._dynamo

from granq_ao.zsq.machine import cpu_name  # noqa: F401  (re-exported: every benchmark header uses it)

__all__ = ["cpu_name", "warm_malloc", "malloc_setting", "environment", "run_header", "write_json",
           "CompileFallbackCounter", "reset_compiled", "synchronize", "time_calls", "time_interleaved",
           "peak_step_bytes", "Target", "check_targets", "format_targets", "fmt"]


# ----------------------------------------------------------------------------- the machine
def warm_malloc() -> bool:
    """glibc: keep freed blocks for reuse (no mmap for blocks < 256 MiB, no heap trimming below
    1 GiB), as a caching allocator (jemalloc, tcmalloc, CUDA's) would: a fresh 13 MB output is
    then not page-faulted in on some calls and reused on others. Returns False where glibc's
    ``mallopt`` is not available (nothing changes)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h; values are C ints
    return bool(mallopt(m_mmap_threshold, 256 * 2**20)) and bool(mallopt(m_trim_threshold, 2**30))


def malloc_setting(warm: bool) -> str:
    """Apply :func:`warm_malloc` if ``warm``; the allocator setting in words, for the run header."""
    if not warm:
        return "glibc default"
    if warm_malloc():
        return "warm (mallopt M_MMAP_THRESHOLD 256 MiB, M_TRIM_THRESHOLD 1 GiB)"
    return "default (mallopt not available here; --warm-malloc had no effect)"


def environment(device: torch.device = torch.device("cpu")) -> Dict[str, object]:
    """What the numbers depend on: date, versions, device (and its name), threads, load."""
    info: Dict[str, object] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "granq_fused_env": os.environ.get("GRANQ_FUSED", "auto"),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    return info


# ----------------------------------------------------------------------------- reports
def run_header(settings: str) -> str:
    """``2026-11-30 09:50 UTC, torch 2.14.1, AMD EPYC, 2 threads, <settings>``."""
    return (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
            f"{cpu_name()}, {torch.get_num_threads()} threads, {settings}")


def write_json(path: str, payload: object) -> None:
    """``payload`` as indented JSON at ``path`` (folders created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=1)


def fmt(value: Optional[float], spec: str) -> str:
    """``value`` formatted with ``spec``; ``-`` for None (not measured)."""
    return "-" if value is None else format(value, spec)


# ----------------------------------------------------------------------------- torch.compile
class CompileFallbackCounter(logging.Handler):
    """Counts torch._dynamo's "hit config.recompile_limit" warnings while entered: after one,
    calls of a compiled function whose guards match no cached graph run eager, silently."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.hits: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "recompile_limit" in message or "cache_size_limit" in message:
            self.hits.append(message.splitlines()[0])

    def __enter__(self) -> "CompileFallbackCounter":
        logging.getLogger("torch._dynamo").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("torch._dynamo").removeHandler(self)


def reset_compiled() -> None:
    """Forget every torch.compile'd graph (as in a fresh process); compiles again on next use."""
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- timers
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_cuda_calls(fn: Callable[[], object], device: torch.device, reps: int, max_reps: int,
                     min_time_s: float) -> List[float]:
    events = []
    started = time.perf_counter()
    while len(events) < max_reps and (len(events) < reps or time.perf_counter() - started < min_time_s):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        events.append((begin, end))
        if len(events) % 16 == 0:
            synchronize(device)  # keep the wall clock honest for min_time_s
    synchronize(device)
    return [begin.elapsed_time(end) / 1e3 for begin, end in events]


def time_calls(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 1,
               min_time_s: float = 0.0, max_reps: Optional[int] = None) -> List[float]:
    """Seconds of each of at least ``reps`` single calls of ``fn`` after ``warmup`` calls.

    Calls go on (up to ``max_reps``) until they add up to ``min_time_s``. CPU: perf_counter
    around each call. CUDA: a pair of CUDA events around each call, read after one final
    synchronize (the GPU time between the events, launch gaps included).
    """
    reps = max(1, reps)
    max_reps = max(reps, max_reps or reps)
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        return _time_cuda_calls(fn, device, reps, max_reps, min_time_s)
    times: List[float] = []
    total = 0.0
    while len(times) < max_reps and (len(times) < reps or total < min_time_s):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        total += elapsed
    return times


def time_interleaved(fns: Dict[str, Callable[[], object]], device: torch.device, reps: int,
                     warmup: int = 1, min_time_s: float = 0.0, max_reps: Optional[int] = None
                     ) -> Dict[str, List[float]]:
    """Like :func:`time_calls` for several callables at once, round-robin: each round times
    one call of each, so a burst of load from elsewhere hits every candidate alike. Rounds go
    on until ``reps`` rounds are done and the calls add up to ``min_time_s`` per callable (at
    most ``max_reps`` rounds)."""
    reps = max(1, reps)
    max_reps = max(reps, max_reps or reps)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: Dict[str, List[float]] = {name: [] for name in fns}
    budget = min_time_s * len(fns)
    total = 0.0
    rounds = 0
    while rounds < max_reps and (rounds < reps or total < budget):
        for name, fn in fns.items():
            spent = time_calls(fn, device, reps=1, warmup=0)[0]
            times[name].append(spent)
            total += spent
        rounds += 1
    return times


# ----------------------------------------------------------------------------- memory
def _cpu_peak_bytes(step: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    handle, path = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    try:
        prof.export_chrome_trace(path)
        with open(path) as trace_file:
            trace = json.load(trace_file)
    finally:
        os.remove(path)
    events = [e for e in trace.get("traceEvents", [])
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0]
    events.sort(key=lambda e: (e.get("ts", 0), e["args"].get("Ev Idx", 0)))
    live = peak = 0
    for event in events:  # frees of blocks allocated before the profile are not reported
        live += int(event["args"]["Bytes"])
        peak = max(peak, live)
    return peak


def peak_step_bytes(step: Callable[[], object], device: torch.device) -> int:
    """Peak tensor bytes allocated during ``step()`` above what was live before it.

    CPU: ``torch.profiler`` with ``profile_memory=True`` over the step: the peak of the running
    sum of the allocator's allocation/free events (process RSS is not used: allocator caching
    and the compiler's own memory make it meaningless). CUDA: ``torch.cuda.max_memory_allocated``
    minus the bytes allocated before the step."""
    if device.type != "cuda":
        return _cpu_peak_bytes(step)
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


# ----------------------------------------------------------------------------- targets
#: ``(text, measured value or None, "<=" | ">=", limit)``
Target = Tuple[str, Optional[float], str, float]


def check_targets(specs: Sequence[Target]) -> List[Dict[str, object]]:
    """Each target as ``{"target", "value", "limit", "op", "status"}``; ``status`` is ``PASS``,
    ``FAIL`` or ``n/a`` (not measured in this run)."""
    results = []
    for text, value, op, limit in specs:
        if value is None:
            status = "n/a"
        else:
            status = "PASS" if (value <= limit if op == "<=" else value >= limit) else "FAIL"
        results.append({"target": f"{text} {op} {limit:g}", "value": value, "limit": limit, "op": op,
                        "status": status})
    return results


def format_targets(targets: Sequence[Dict[str, object]], title: str = "targets (measured in this run)") -> str:
    lines = [title]
    for target in targets:
        lines.append(f"  [{target['status']:4s}] {target['target']:78s} measured {fmt(target['value'], '.3f')}")
    return "\n".join(lines)
