"""Fake-quant latency of GranQ vs its baselines, and the cost of a QAT training step.

Part 1 (the paper's latency figure, plus torch.ao references). On ResNet-20 CIFAR activation
shapes ``(N, 16, 32, 32)``, ``(N, 32, 16, 16)``, ``(N, 64, 8, 8)`` for each batch ``N``, the
median time of one call, forward and forward+backward, of:

==================  ==========================================================================
clone               ``torch.clone(x)``: the memory-copy floor (one read + one write of ``x``)
torchao_fq          torch.ao ``FakeQuantize`` (MovingAverageMinMaxObserver, per-tensor,
                    ``quant_min=0, quant_max=2^b - 1``)
torchao_fused       torch.ao ``FusedMovingAvgObsFakeQuantize`` (same observer and range)
tensor              ``GranQFakeQuantize(granularity="tensor")``   (paper: layer-wise)
channel             ``GranQFakeQuantize(granularity="channel")``  (paper: channel-wise)
granq_iterative     ``GranQFakeQuantize(granularity="granq_iterative")`` (paper: iterative; slow)
granq               ``GranQFakeQuantize(granularity="granq")``    (paper: GranQ; what users run)
granq_fn_eager      ``functional.fake_quantize(x, b, "granq", fused="eager")``
granq_fn_compiled   ``functional.fake_quantize(x, b, "granq", fused="compiled")``
==================  ==========================================================================

Modules run in training mode (observers on), with the default ``fused="auto"`` backend.
Three modes, each with a preallocated upstream gradient ``grad``:

* ``fwd``: ``y = op(x)`` with ``x.requires_grad=False``.
* ``fwdgrad`` (forward+backward as inside a network): ``torch.autograd.grad(op(x), x, grad)``.
  The input gradient is handed back as autograd computes it, as it is handed to the previous
  layer in a QAT model, where a fake-quant's input is an intermediate activation.
* ``fwdbwd`` (forward+backward into a leaf): ``op(x).backward(grad)`` with ``x.grad`` reset to
  None before each call. autograd's AccumulateGrad then stores a *copy* of the incoming
  gradient in ``x.grad`` (the caller still holds ``grad``): one extra 1x-read + 1x-write
  pass that every candidate pays alike and that no fake-quant inside a network pays.

Each time is the median over single calls after warm-up
(compilation happens in warm-up and is excluded); CPU calls are timed with
``time.perf_counter``, CUDA calls with CUDA events (``torch.cuda.synchronize`` around the run).
Ratios are against ``clone`` and ``torchao_fq`` measured in the same run, same shape, same mode.

Part 2 (QAT step): pytorchcv ``resnet20_cifar10``, batch 200 of random images, ``W{b}A{b}``:
``float`` (no quantization), ``granq_all`` / ``granq_paper`` (``granq_ao.prepare_qat_fx`` with
``get_granq_qat_qconfig_mapping(b, b, act_placement=...)``), ``torchao_fq`` (torch.ao's
``prepare_qat_fx`` with ``get_default_qat_qconfig_mapping("x86")`` whose global qconfig is
``FakeQuantize`` + ``MovingAverageMinMaxObserver`` on ``[0, 2^b - 1]`` for activations and
``MovingAveragePerChannelMinMaxObserver`` per-channel symmetric on ``[-2^(b-1), 2^(b-1) - 1]``
for weights) and ``torchao_fused`` (same ranges with the ``FusedMovingAvgObsFakeQuantize``
class that torch.ao's x86 default actually uses). Inserted fake-quants are counted. Time per
step = forward + cross-entropy + backward + SGD step (median after warm-up). Peak memory:

* CPU: ``torch.profiler`` with ``profile_memory=True`` over one step (gradients cleared just
  before it): the running sum of the allocator's allocation/free events, i.e. the peak of
  tensor bytes allocated *during the step* above what was live before it (activations saved
  for backward, gradients, temporaries). Process RSS is not used: the allocator's caching and
  the compiler's own memory make it noisy.
* CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocated bytes before the step.

torch.compile: GranQ compiles one copy of its step per input pattern (rank, dtype, reduced
dims, bit width), each with its own torch._dynamo recompile budget (8 by default), so the limit
should never be hit. The latency part still raises it (``--latency-recompile-limit``, default
64: the torch.ao candidates and the user's own code share torch's default); the QAT part keeps
torch's default and resets compiled graphs before each config, as a user's process would be.
Both count the limit hits and print them: a hit means some compiled calls ran eager.

CPU allocator: glibc returns large freed blocks to the OS (mmap threshold / heap trimming), so
a 13 MB output may be page-faulted in afresh on one call and reused on the next, depending on
what the previous candidate freed: times of every candidate then swing by 2-3x from run to run.
``--warm-malloc`` sets glibc's ``M_MMAP_THRESHOLD`` (256 MiB) and ``M_TRIM_THRESHOLD`` (1 GiB)
with ``mallopt`` at start, so freed blocks are reused as a caching allocator (jemalloc,
tcmalloc, CUDA's caching allocator) would; the run header says which allocator setting was used.

Run ``python benchmarks/fake_quant_latency.py --help``; ``--quick`` is the CI smoke setting.
A final "targets" block checks the issue's goals at ``(200, 16, 32, 32)``, fp32, ``--bits``.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch._dynamo

warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao")
warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*deprecated.*")

from granq_ao import GranQFakeQuantize  # noqa: E402
from granq_ao import functional as F  # noqa: E402

ACT_SHAPES: Tuple[Tuple[int, int, int], ...] = ((16, 32, 32), (32, 16, 16), (64, 8, 8))
DEFAULT_BATCHES: Tuple[int, ...] = (16, 32, 64, 128, 200)
TARGET_SHAPE: Tuple[int, int, int, int] = (200, 16, 32, 32)
MODES = ("fwd", "fwdgrad", "fwdbwd")
MODE_TITLES = {"fwd": "forward", "fwdgrad": "fwd+bwd, autograd.grad (as in a network)",
               "fwdbwd": "fwd+bwd, .backward() into a leaf's .grad (+1 copy)"}

CANDIDATES: Dict[str, str] = {
    "clone": "torch.clone (memory-copy floor)",
    "torchao_fq": "torch.ao FakeQuantize, MovingAverageMinMax, per-tensor",
    "torchao_fused": "torch.ao FusedMovingAvgObsFakeQuantize, per-tensor",
    "tensor": "GranQFakeQuantize granularity=tensor (layer-wise)",
    "channel": "GranQFakeQuantize granularity=channel (channel-wise)",
    "granq_iterative": "GranQFakeQuantize granularity=granq_iterative (Python loop)",
    "granq": "GranQFakeQuantize granularity=granq (module, auto backend)",
    "granq_fn_eager": "functional.fake_quantize granq, fused='eager'",
    "granq_fn_compiled": "functional.fake_quantize granq, fused='compiled' (torch.compile)",
    "torchao_intx": "torchao IntxFakeQuantizer per-token asymmetric on the (N*C, H*W) view (= GranQ's numbers)",
    "modelopt_dynamic": "modelopt TensorQuantizer type=dynamic axis=(0, 1), symmetric abs-max (not GranQ's numbers)",
}
# Candidates from an optional toolchain: timed by default only where that package is installed.
OPTIONAL_CANDIDATES: Dict[str, str] = {"torchao_intx": "torchao", "modelopt_dynamic": "modelopt"}


def available_candidates() -> List[str]:
    """Every candidate whose toolchain is installed here (the default ``--candidates``)."""
    import importlib.util

    return [name for name in CANDIDATES
            if name not in OPTIONAL_CANDIDATES or importlib.util.find_spec(OPTIONAL_CANDIDATES[name]) is not None]
QAT_CONFIGS: Dict[str, str] = {
    "float": "no quantization",
    "granq_all": "granq_ao.prepare_qat_fx, get_granq_qat_qconfig_mapping(act_placement='all')",
    "granq_paper": "granq_ao.prepare_qat_fx, get_granq_qat_qconfig_mapping(act_placement='paper')",
    "torchao_fq": "torch.ao prepare_qat_fx, x86 default mapping, FakeQuantize + MovingAverage observers",
    "torchao_fused": "torch.ao prepare_qat_fx, x86 default mapping, FusedMovingAvgObsFakeQuantize",
}


# ----------------------------------------------------------------------------- environment
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def warm_malloc() -> bool:
    """glibc: keep freed blocks for reuse (no mmap for blocks < 256 MiB, no heap trimming below
    1 GiB). Returns False where glibc's ``mallopt`` is not available (nothing changes)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h; values are C ints
    return bool(mallopt(m_mmap_threshold, 256 * 2**20)) and bool(mallopt(m_trim_threshold, 2**30))


def environment(device: torch.device) -> Dict[str, object]:
    """What the numbers depend on: versions, device, threads, date, load."""
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


class CompileFallbackCounter(logging.Handler):
    """Counts torch._dynamo's "hit config.recompile_limit" warnings: after one, calls of a
    compiled function whose guards match no cached graph run eager, silently."""

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


# ----------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    times: List[float] = []
    if device.type == "cuda":
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
    total = 0.0
    while len(times) < max_reps and (len(times) < reps or total < min_time_s):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        total += elapsed
    return times


# ----------------------------------------------------------------------------- candidates
def make_fake_quant(name: str, bits: int, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The callable ``x -> fake-quantized x`` for a candidate name (see ``CANDIDATES``)."""
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver
    from torch.ao.quantization.fake_quantize import FusedMovingAvgObsFakeQuantize

    q_min, q_max = F.quant_range(bits)
    if name == "clone":
        return torch.clone
    if name in ("torchao_fq", "torchao_fused"):
        cls = FakeQuantize if name == "torchao_fq" else FusedMovingAvgObsFakeQuantize
        module = cls(observer=MovingAverageMinMaxObserver, quant_min=q_min, quant_max=q_max,
                     dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=False)
        return module.to(device).train()
    if name in ("tensor", "channel", "granq_iterative", "granq"):
        return GranQFakeQuantize(bits=bits, granularity=name).to(device).train()
    if name == "granq_fn_eager":
        return lambda x: F.fake_quantize(x, bits, "granq", fused="eager")
    if name == "granq_fn_compiled":
        return lambda x: F.fake_quantize(x, bits, "granq", fused="compiled")
    if name == "torchao_intx":
        # torchao's own dynamic QAT fake-quant, one asymmetric range per row of the (N*C, H*W)
        # view: GranQ's per-(sample, channel) ranges (0 lies in every range of these inputs, so
        # torchao's range widening to include 0 changes nothing; tested equal).
        from torchao.quantization.qat import IntxFakeQuantizeConfig
        from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

        dtype = getattr(torch, f"int{bits}")
        quantizer = IntxFakeQuantizer(IntxFakeQuantizeConfig(dtype=dtype, granularity="per_token",
                                                             is_symmetric=False)).to(device)
        return lambda x: quantizer(x.reshape(x.shape[0] * x.shape[1], -1)).reshape(x.shape)
    if name == "modelopt_dynamic":
        # modelopt's closest shipped quantizer: dynamic amax per (sample, channel), symmetric.
        from modelopt.torch.quantization.config import QuantizerAttributeConfig
        from modelopt.torch.quantization.nn import TensorQuantizer

        return TensorQuantizer(QuantizerAttributeConfig(num_bits=bits, axis=(0, 1), type="dynamic")).to(device)
    raise ValueError(f"unknown candidate {name!r}; expected one of {', '.join(CANDIDATES)}")


def act_shapes(batches: Sequence[int]) -> List[Tuple[int, int, int, int]]:
    return [(n, c, h, w) for n in batches for (c, h, w) in ACT_SHAPES]


def _step(op: Callable, x: torch.Tensor, grad: torch.Tensor, mode: str) -> Callable[[], object]:
    """One timed call of ``op`` in ``mode`` (see the module docstring)."""
    if mode == "fwd":
        return lambda: op(x)
    if mode == "fwdgrad":
        return lambda: torch.autograd.grad(op(x), x, grad)

    def forward_backward_into_leaf():
        x.grad = None
        op(x).backward(grad)
    return forward_backward_into_leaf


def time_interleaved(fns: Dict[str, Callable[[], object]], device: torch.device, reps: int,
                     warmup: int = 1, min_time_s: float = 0.0, max_reps: Optional[int] = None
                     ) -> Dict[str, List[float]]:
    """Like :func:`time_calls` for several callables at once, round-robin: each round times
    one call of each, so a burst of load from elsewhere hits every candidate alike (the
    ratios stay honest on a shared machine). Rounds go on until ``reps`` rounds are done and
    the calls add up to ``min_time_s`` per callable (at most ``max_reps`` rounds)."""
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


def run_latency(batches: Sequence[int] = DEFAULT_BATCHES, candidates: Optional[Sequence[str]] = None,
                bits: int = 3, device: torch.device = torch.device("cpu"), reps: int = 10,
                warmup: int = 2, min_time_s: float = 0.5, max_reps: int = 200,
                iterative: str = "all", iterative_reps: int = 2, dtype: torch.dtype = torch.float32,
                log: Optional[Callable[[str], None]] = None) -> List[Dict[str, object]]:
    """One row per (shape, candidate): median ms, reps and ratios for both modes.

    The candidates of one (shape, mode) are timed interleaved (:func:`time_interleaved`),
    except ``granq_iterative`` (far slower): timed alone with ``iterative_reps`` calls after one
    warm-up call, on ``iterative`` = ``"all"`` shapes, ``"target"`` (only ``TARGET_SHAPE``) or
    ``"off"``. Ratio columns are None when their reference candidate is not measured.
    ``candidates=None``: :func:`available_candidates`.
    """
    candidates = available_candidates() if candidates is None else candidates
    unknown = [c for c in candidates if c not in CANDIDATES]
    if unknown:
        raise ValueError(f"unknown candidates {unknown}; expected some of {', '.join(CANDIDATES)}")
    if iterative not in ("all", "target", "off"):
        raise ValueError(f"iterative must be all, target or off; got {iterative!r}")
    generator = torch.Generator().manual_seed(0)
    rows: List[Dict[str, object]] = []
    for shape in act_shapes(batches):
        x = torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
        grad = torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
        x_grad = x.clone().requires_grad_(True)
        measured = [name for name in candidates
                    if not (name == "granq_iterative" and (iterative == "off" or (
                        iterative == "target" and tuple(shape) != TARGET_SHAPE)))]
        by_name: Dict[str, Dict[str, object]] = {
            name: {"shape": list(shape), "candidate": name} for name in measured}
        for mode in MODES:
            # fresh modules per mode: the same observer state for both modes
            fns = {name: _step(make_fake_quant(name, bits, device), x if mode == "fwd" else x_grad,
                               grad, mode) for name in measured}
            slow = fns.pop("granq_iterative", None)
            times = time_interleaved(fns, device, reps=reps, warmup=warmup, min_time_s=min_time_s,
                                     max_reps=max_reps)
            if slow is not None:
                times["granq_iterative"] = time_calls(slow, device, reps=iterative_reps, warmup=1)
            for name, spent in times.items():
                by_name[name][f"{mode}_ms"] = statistics.median(spent) * 1e3
                by_name[name][f"{mode}_min_ms"] = min(spent) * 1e3
                by_name[name][f"{mode}_reps"] = len(spent)
        for name in measured:
            row = by_name[name]
            for mode in MODES:
                for ref, column in (("clone", "x_clone"), ("torchao_fq", "x_torchao_fq")):
                    ref_row = by_name.get(ref)
                    row[f"{mode}_{column}"] = (row[f"{mode}_ms"] / ref_row[f"{mode}_ms"]
                                               if ref_row is not None else None)
            rows.append(row)
            if log:
                log(f"  {str(tuple(shape)):18s} {name:18s} fwd {row['fwd_ms']:9.3f} ms   "
                    f"fwd+bwd {row['fwdgrad_ms']:9.3f} ms (leaf {row['fwdbwd_ms']:.3f})")
    return rows


# ----------------------------------------------------------------------------- QAT step
def torchao_qat_mapping(bits: int, fused: bool = False):
    """torch.ao's x86 default QAT mapping with its global qconfig on ``bits``-bit ranges:
    activations per-tensor affine on [0, 2^b - 1], weights per-channel symmetric on
    [-2^(b-1), 2^(b-1) - 1]; ``FakeQuantize`` or (``fused``) ``FusedMovingAvgObsFakeQuantize``."""
    from torch.ao.quantization import (FakeQuantize, MovingAverageMinMaxObserver,
                                       MovingAveragePerChannelMinMaxObserver, QConfig,
                                       get_default_qat_qconfig_mapping)
    from torch.ao.quantization.fake_quantize import FusedMovingAvgObsFakeQuantize

    cls = FusedMovingAvgObsFakeQuantize if fused else FakeQuantize
    a_min, a_max = F.quant_range(bits)
    w_min, w_max = F.quant_range(bits, symmetric=True)
    qconfig = QConfig(
        activation=cls.with_args(observer=MovingAverageMinMaxObserver, quant_min=a_min, quant_max=a_max,
                                 dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=False),
        weight=cls.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=w_min,
                             quant_max=w_max, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                             ch_axis=0),
    )
    return get_default_qat_qconfig_mapping("x86").set_global(qconfig)


def count_fake_quants(model: torch.nn.Module) -> Dict[str, int]:
    """Fake-quants in a prepared model: weight ones (``*.weight_fake_quant`` modules),
    activation call sites in the FX graph (a shared instance once per call) and the distinct
    activation modules behind them."""
    from torch.ao.quantization.fake_quantize import FakeQuantizeBase

    from granq_ao.integrations.torch_ao import activation_fake_quant_calls

    weight = sum(1 for name, m in model.named_modules()
                 if isinstance(m, FakeQuantizeBase) and name.split(".")[-1] == "weight_fake_quant")
    calls = activation_fake_quant_calls(model, FakeQuantizeBase) if hasattr(model, "graph") else []
    return {"weight_fq": weight, "act_fq_modules": len({id(m) for m in calls}), "act_fq_calls": len(calls)}


def build_qat_model(config: str, bits: int, batch: int, device: torch.device) -> torch.nn.Module:
    """pytorchcv ResNet-20 (CIFAR-10, random init), prepared for QAT as ``config`` says."""
    import granq_ao
    from pytorchcv.model_provider import get_model
    from torch.ao.quantization.quantize_fx import prepare_qat_fx as torch_prepare_qat_fx

    if config not in QAT_CONFIGS:
        raise ValueError(f"unknown QAT config {config!r}; expected one of {', '.join(QAT_CONFIGS)}")
    torch.manual_seed(0)
    model = get_model("resnet20_cifar10", pretrained=False).train()
    example = (torch.randn(batch, 3, 32, 32),)
    if config == "granq_all":
        model = granq_ao.prepare_qat_fx(model, granq_ao.get_granq_qat_qconfig_mapping(bits, bits), example)
    elif config == "granq_paper":
        mapping = granq_ao.get_granq_qat_qconfig_mapping(bits, bits, act_placement="paper")
        model = granq_ao.prepare_qat_fx(model, mapping, example)
    elif config in ("torchao_fq", "torchao_fused"):
        model = torch_prepare_qat_fx(model, torchao_qat_mapping(bits, fused=config == "torchao_fused"), example)
    return model.to(device).train()


def _peak_step_bytes(step: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated during ``step()`` above what was live before it (see module doc)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
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


def run_qat(configs: Sequence[str] = tuple(QAT_CONFIGS), bits: int = 3, batch: int = 200,
            device: torch.device = torch.device("cpu"), reps: int = 10, warmup: int = 3,
            memory: bool = True, log: Optional[Callable[[str], None]] = None) -> List[Dict[str, object]]:
    """One row per QAT config: fake-quant counts, median step ms, peak step memory (MiB)."""
    rows: List[Dict[str, object]] = []
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, 32, 32, generator=generator).to(device)
    labels = torch.randint(0, 10, (batch,), generator=generator).to(device)
    for config in configs:
        reset_compiled()  # each config starts like a fresh process (compiles in its warm-up)
        model = build_qat_model(config, bits, batch, device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        loss_fn = torch.nn.CrossEntropyLoss()

        def forward_backward():
            loss_fn(model(images), labels).backward()

        def step():
            optimizer.zero_grad(set_to_none=True)
            forward_backward()
            optimizer.step()

        times = time_calls(step, device, reps=reps, warmup=warmup)
        row: Dict[str, object] = {"config": config, **count_fake_quants(model),
                                  "step_ms": statistics.median(times) * 1e3, "reps": len(times)}
        if memory:
            optimizer.zero_grad(set_to_none=True)

            def profiled_step():
                forward_backward()
                optimizer.step()
            row["peak_mib"] = _peak_step_bytes(profiled_step, device) / 2**20
        rows.append(row)
        if log:
            log(f"  {config:14s} step {row['step_ms']:9.1f} ms  peak {row.get('peak_mib', float('nan')):8.1f} MiB  "
                f"fq: weight {row['weight_fq']}, act {row['act_fq_calls']}")
        del model, optimizer
    ref = next((r for r in rows if r["config"] == "torchao_fq"), None)
    for row in rows:
        row["x_torchao_fq_step"] = row["step_ms"] / ref["step_ms"] if ref else None
        row["x_torchao_fq_peak"] = (row["peak_mib"] / ref["peak_mib"]
                                    if ref and "peak_mib" in row and ref["peak_mib"] else None)
    return rows


# ----------------------------------------------------------------------------- reporting
def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_latency_table(rows: Sequence[Dict[str, object]]) -> str:
    """Side-by-side table: per shape, one line per candidate; per mode (forward | fwd+bwd via
    autograd.grad | fwd+bwd into a leaf) the median ms and its ratios to clone and torch.ao."""
    head = f"{'candidate':18s}" + "".join(
        f" | {title + ' ms':>13s} {'x clone':>7s} {'x ao-FQ':>7s}"
        for title in ("fwd", "fwd+bwd", "leaf fwd+bwd")) + f" | {'reps':>11s}"
    legend = "  ".join(f"{title}: {MODE_TITLES[mode]}" for title, mode in
                       (("fwd", "fwd"), ("fwd+bwd", "fwdgrad"), ("leaf fwd+bwd", "fwdbwd")))
    lines: List[str] = [legend]
    shape = None
    for row in rows:
        if row["shape"] != shape:
            shape = row["shape"]
            lines += ["", f"shape {tuple(shape)}", head, "-" * len(head)]
        lines.append(f"{row['candidate']:18s}" + "".join(
            f" | {row[f'{mode}_ms']:13.3f} {_fmt(row[f'{mode}_x_clone'], '7.2f')} "
            f"{_fmt(row[f'{mode}_x_torchao_fq'], '7.3f')}" for mode in MODES)
            + " | " + "/".join(str(row[f"{mode}_reps"]) for mode in MODES).rjust(11))
    return "\n".join(lines)


def format_qat_table(rows: Sequence[Dict[str, object]]) -> str:
    head = (f"{'config':14s} | {'weight fq':>9s} {'act fq':>6s} {'(modules)':>9s} | {'step ms':>9s} "
            f"{'x ao-FQ':>8s} | {'peak MiB':>9s} {'x ao-FQ':>8s} | description")
    lines = [head, "-" * len(head)]
    for row in rows:
        lines.append(
            f"{row['config']:14s} | {row['weight_fq']:9d} {row['act_fq_calls']:6d} {row['act_fq_modules']:9d} | "
            f"{row['step_ms']:9.1f} {_fmt(row['x_torchao_fq_step'], '8.3f')} | "
            f"{_fmt(row.get('peak_mib'), '9.1f')} {_fmt(row.get('x_torchao_fq_peak'), '8.3f')} | "
            f"{QAT_CONFIGS[row['config']]}")
    return "\n".join(lines)


def evaluate_targets(latency_rows: Sequence[Dict[str, object]], qat_rows: Sequence[Dict[str, object]]
                     ) -> List[Dict[str, object]]:
    """The issue's targets at ``TARGET_SHAPE`` and for the QAT step.

    The fwd+bwd latency targets are evaluated for both backward methods (``fwdgrad``: as inside
    a network; ``fwdbwd``: into a leaf's ``.grad``), the speed-up over ``granq_iterative`` also
    for the forward alone (the paper's latency figure times quantization, a forward op).
    Each entry: ``target`` (text), ``value`` (measured, None if not measured), ``limit``,
    ``op``, ``status`` ("PASS" | "FAIL" | "n/a").
    """
    at_target = {r["candidate"]: r for r in latency_rows if tuple(r["shape"]) == TARGET_SHAPE}
    qat = {r["config"]: r for r in qat_rows}

    def ratio(table, num, den, key):
        if num in table and den in table and table[den].get(key) and key in table[num]:
            return table[num][key] / table[den][key]
        return None

    shape = "x".join(map(str, TARGET_SHAPE))
    specs = []
    for mode, how in (("fwdgrad", "fwd+bwd"), ("fwdbwd", "leaf fwd+bwd")):
        key = f"{mode}_ms"
        specs += [
            (f"GranQFakeQuantize {how} / clone floor at {shape}", ratio(at_target, "granq", "clone", key), "<=", 4.0),
            (f"GranQFakeQuantize {how} / torch.ao FakeQuantize at {shape}",
             ratio(at_target, "granq", "torchao_fq", key), "<=", 0.25),
            (f"speed-up of granq over granq_iterative ({how}) at {shape}",
             ratio(at_target, "granq_iterative", "granq", key), ">=", 50.0),
        ]
    specs += [
        (f"speed-up of granq over granq_iterative (fwd) at {shape}",
         ratio(at_target, "granq_iterative", "granq", "fwd_ms"), ">=", 50.0),
        ("ResNet-20 QAT step time, granq_all / torchao_fq", ratio(qat, "granq_all", "torchao_fq", "step_ms"), "<=", 1.1),
        ("ResNet-20 QAT step time, granq_paper / torchao_fq", ratio(qat, "granq_paper", "torchao_fq", "step_ms"), "<=", 1.1),
        ("ResNet-20 QAT peak step memory, granq_all / torchao_fq",
         ratio(qat, "granq_all", "torchao_fq", "peak_mib"), "<=", 1.0),
        ("ResNet-20 QAT peak step memory, granq_paper / torchao_fq",
         ratio(qat, "granq_paper", "torchao_fq", "peak_mib"), "<=", 1.0),
    ]
    results = []
    for text, value, op, limit in specs:
        if value is None:
            status = "n/a"
        else:
            status = "PASS" if (value <= limit if op == "<=" else value >= limit) else "FAIL"
        results.append({"target": f"{text} {op} {limit:g}", "value": value, "limit": limit, "op": op,
                        "status": status})
    return results


def format_targets(targets: Sequence[Dict[str, object]]) -> str:
    lines = ["targets (fp32; measured in this run)"]
    for t in targets:
        lines.append(f"  [{t['status']:4s}] {t['target']:78s} measured {_fmt(t['value'], '.3f')}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=3, help="bits for activations and weights (default 3)")
    parser.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",") if v],
                        default=list(DEFAULT_BATCHES), help="comma-separated batch sizes (default 16,32,64,128,200)")
    parser.add_argument("--candidates", type=lambda s: [v for v in s.split(",") if v],
                        default=available_candidates(),
                        help=f"comma-separated subset of: {', '.join(CANDIDATES)} (default: all whose toolchain "
                             f"is installed)")
    parser.add_argument("--quick", action="store_true",
                        help="few repetitions, granq_iterative only at the target shape (CI smoke)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--reps", type=int, default=None, help="minimum timed calls per measurement")
    parser.add_argument("--iterative", choices=("all", "target", "off"), default=None,
                        help="shapes on which to time granq_iterative (default all; target with --quick)")
    parser.add_argument("--iterative-reps", type=int, default=None, help="timed calls of granq_iterative (default 2)")
    parser.add_argument("--skip-qat", action="store_true", help="skip the ResNet-20 QAT step benchmark")
    parser.add_argument("--qat-batch", type=int, default=200)
    parser.add_argument("--qat-configs", type=lambda s: [v for v in s.split(",") if v],
                        default=list(QAT_CONFIGS), help=f"comma-separated subset of: {', '.join(QAT_CONFIGS)}")
    parser.add_argument("--latency-recompile-limit", type=int, default=64,
                        help="torch._dynamo recompile limit during the latency part (default 64: every "
                             "shape/granularity/requires_grad combination gets its compiled graph; torch's "
                             "default 8 is restored for the QAT part)")
    parser.add_argument("--warm-malloc", action="store_true",
                        help="CPU: make glibc reuse freed blocks (mallopt; see the module docstring) so "
                             "page faults of fresh 13 MB buffers do not land on random candidates")
    parser.add_argument("--json", metavar="OUT", default=None, help="write machine-readable results here")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    F.quant_range(args.bits)
    malloc = "glibc default"
    if args.warm_malloc:
        malloc = ("warm (mallopt M_MMAP_THRESHOLD 256 MiB, M_TRIM_THRESHOLD 1 GiB)" if warm_malloc()
                  else "default (mallopt not available here; --warm-malloc had no effect)")
    reps = args.reps or (5 if args.quick else 20)
    settings = {
        "bits": args.bits, "batches": args.batches, "candidates": args.candidates, "quick": args.quick,
        "reps": reps, "min_time_s": 0.05 if args.quick else 0.5,
        "iterative": args.iterative or ("target" if args.quick else "all"),
        "iterative_reps": args.iterative_reps or (1 if args.quick else 2),
    }
    env = environment(device)
    env["malloc"] = malloc

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    print("granq_ao fake-quant latency benchmark")
    for key in ("date", "torch", "python", "device", "device_name", "threads", "cpu_count", "loadavg",
                "granq_fused_env", "malloc"):
        if key in env:
            print(f"  {key:16s} {env[key]}")
    print(f"  {'bits':16s} {args.bits} (activations [0, {2**args.bits - 1}])")
    print(f"  {'settings':16s} reps>={reps}, min {settings['min_time_s']} s per measurement, "
          f"granq_iterative: {settings['iterative']} x{settings['iterative_reps']}")
    sys.stdout.flush()

    log("latency (progress)")
    dynamo_config = torch._dynamo.config
    default_limit = dynamo_config.recompile_limit
    reset_compiled()
    dynamo_config.recompile_limit = max(default_limit, args.latency_recompile_limit)
    try:
        with CompileFallbackCounter() as fallbacks:
            latency = run_latency(args.batches, args.candidates, args.bits, device, reps=reps,
                                  warmup=2, min_time_s=settings["min_time_s"], max_reps=200,
                                  iterative=settings["iterative"], iterative_reps=settings["iterative_reps"],
                                  log=log)
    finally:
        dynamo_config.recompile_limit = default_limit
    env["latency_recompile_limit"] = max(default_limit, args.latency_recompile_limit)
    env["latency_compile_fallbacks"] = len(fallbacks.hits)
    env["granq_backend"] = F.fused_backend("auto")
    print(f"  {'granq backend':16s} {env['granq_backend']} (GranQFakeQuantize fused='auto' resolved to this)")
    print("\nfake-quant latency, median ms per call; ratios vs clone and vs torch.ao FakeQuantize (same run)")
    print(format_latency_table(latency))
    print(f"(torch._dynamo recompile limit {env['latency_recompile_limit']} here; hits: "
          f"{env['latency_compile_fallbacks']}{', some compiled calls ran EAGER' if fallbacks.hits else ''})")

    qat: List[Dict[str, object]] = []
    if not args.skip_qat:
        log("QAT step (progress)")
        with CompileFallbackCounter() as qat_fallbacks:
            qat = run_qat(args.qat_configs, args.bits, args.qat_batch, device,
                          reps=2 if args.quick else 10, warmup=1 if args.quick else 3, log=log)
        env["qat_compile_fallbacks"] = len(qat_fallbacks.hits)
        memory_method = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                         else "torch.profiler profile_memory: peak of allocated-minus-freed bytes during one step")
        print(f"\nResNet-20 CIFAR-10 QAT step, batch {args.qat_batch}, W{args.bits}A{args.bits}, "
              f"forward+CE+backward+SGD step; peak memory: {memory_method}")
        print(format_qat_table(qat))
        print(f"(torch._dynamo recompile limit {torch._dynamo.config.recompile_limit} (torch's default), compiled "
              f"graphs reset before each config; limit hits: {env['qat_compile_fallbacks']}"
              f"{': the GranQ fake-quants whose inputs matched no cached graph ran EAGER' if qat_fallbacks.hits else ''})")

    targets = evaluate_targets(latency, qat)
    print()
    print(format_targets(targets))
    result = {"environment": env, "settings": settings, "latency": latency, "qat": qat, "targets": targets}
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)
        print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    main()
