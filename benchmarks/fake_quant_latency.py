"""Fake-quant latency of GranQ vs its baselines (the paper's latency figure, plus torch.ao references).

On ResNet-20 CIFAR activation
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

torch.compile: GranQ compiles one copy of its step per input pattern (rank, dtype, reduced
dims, bit width), each with its own torch._dynamo recompile budget (8 by default), so the limit
should never be hit. The run still raises it (``--latency-recompile-limit``, default 64: the
torch.ao candidates and the user's own code share torch's default), counts the limit hits and
prints them: a hit means some compiled calls ran eager.

CPU allocator: glibc returns large freed blocks to the OS (mmap threshold / heap trimming), so
a 13 MB output may be page-faulted in afresh on one call and reused on the next, depending on
what the previous candidate freed: times of every candidate then swing by 2-3x from run to run.
``--warm-malloc`` sets glibc's ``M_MMAP_THRESHOLD`` (256 MiB) and ``M_TRIM_THRESHOLD`` (1 GiB)
with ``mallopt`` at start, so freed blocks are reused as a caching allocator (jemalloc,
tcmalloc, CUDA's caching allocator) would; the run header says which allocator setting was used.

Run ``python benchmarks/fake_quant_latency.py --help``; ``--quick`` is the CI smoke setting.
``--check`` prints the issue's targets at ``(200, 16, 32, 32)``, fp32, ``--bits`` and exits 1 if
one fails. The cost of a whole QAT step (and its peak memory) is ``qat_step_toolchains.py``.
Harness (timers, environment, allocator, compile-fallback counter): :mod:`benchmarks.harness`.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch._dynamo  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao")
warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*deprecated.*")

from benchmarks.harness import (CompileFallbackCounter, check_targets, environment, fmt, format_targets,  # noqa: E402
                                malloc_setting, reset_compiled, time_calls, time_interleaved, write_json)
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


def mode_call(op: Callable, x: torch.Tensor, grad: torch.Tensor, mode: str) -> Callable[[], object]:
    """One timed call of ``op`` in ``mode`` (see the module docstring)."""
    if mode == "fwd":
        return lambda: op(x)
    if mode == "fwdgrad":
        return lambda: torch.autograd.grad(op(x), x, grad)

    def forward_backward_into_leaf():
        x.grad = None
        op(x).backward(grad)
    return forward_backward_into_leaf


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
            fns = {name: mode_call(make_fake_quant(name, bits, device), x if mode == "fwd" else x_grad,
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


# ----------------------------------------------------------------------------- reporting
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
            f" | {row[f'{mode}_ms']:13.3f} {fmt(row[f'{mode}_x_clone'], '7.2f')} "
            f"{fmt(row[f'{mode}_x_torchao_fq'], '7.3f')}" for mode in MODES)
            + " | " + "/".join(str(row[f"{mode}_reps"]) for mode in MODES).rjust(11))
    return "\n".join(lines)


def evaluate_targets(latency_rows: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
    """The issue's latency targets at ``TARGET_SHAPE`` (``--check``), as
    :func:`benchmarks.harness.check_targets` entries (status PASS / FAIL / n/a).

    For each fwd+bwd mode (``fwdgrad``: as inside a network; ``fwdbwd``: into a leaf's
    ``.grad``): ``granq`` <= 4x ``clone``, ``granq`` <= 0.25x ``torchao_fq``, ``granq_iterative``
    >= 50x ``granq``; the same speed-up for the forward alone (the paper's latency figure times
    quantization, a forward op).
    """
    at_target = {r["candidate"]: r for r in latency_rows if tuple(r["shape"]) == TARGET_SHAPE}

    def ratio(num: str, den: str, key: str) -> Optional[float]:
        if num in at_target and den in at_target and at_target[den].get(key) and key in at_target[num]:
            return at_target[num][key] / at_target[den][key]
        return None

    shape = "x".join(map(str, TARGET_SHAPE))
    specs = []
    for mode, how in (("fwdgrad", "fwd+bwd"), ("fwdbwd", "leaf fwd+bwd")):
        key = f"{mode}_ms"
        specs += [
            (f"GranQFakeQuantize {how} / clone floor at {shape}", ratio("granq", "clone", key), "<=", 4.0),
            (f"GranQFakeQuantize {how} / torch.ao FakeQuantize at {shape}", ratio("granq", "torchao_fq", key),
             "<=", 0.25),
            (f"speed-up of granq over granq_iterative ({how}) at {shape}", ratio("granq_iterative", "granq", key),
             ">=", 50.0),
        ]
    specs.append((f"speed-up of granq over granq_iterative (fwd) at {shape}",
                  ratio("granq_iterative", "granq", "fwd_ms"), ">=", 50.0))
    return check_targets(specs)


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
    parser.add_argument("--latency-recompile-limit", type=int, default=64,
                        help="torch._dynamo recompile limit during the latency part (default 64: every "
                             "shape/granularity/requires_grad combination gets its compiled graph; torch's "
                             "default 8 is restored afterwards)")
    parser.add_argument("--warm-malloc", action="store_true",
                        help="CPU: make glibc reuse freed blocks (mallopt; see the module docstring) so "
                             "page faults of fresh 13 MB buffers do not land on random candidates")
    parser.add_argument("--check", action="store_true",
                        help="print the issue's latency targets (PASS / FAIL / n/a) and exit 1 if one fails")
    parser.add_argument("--json", metavar="OUT", default=None, help="write machine-readable results here")
    return parser.parse_args(argv)


def settings_of(args: argparse.Namespace) -> Dict[str, object]:
    """The run's settings (``--quick`` defaults filled in), as written to the JSON."""
    return {
        "bits": args.bits, "batches": args.batches, "candidates": args.candidates, "quick": args.quick,
        "reps": args.reps or (5 if args.quick else 20), "min_time_s": 0.05 if args.quick else 0.5,
        "iterative": args.iterative or ("target" if args.quick else "all"),
        "iterative_reps": args.iterative_reps or (1 if args.quick else 2),
    }


def print_header(env: Dict[str, object], settings: Dict[str, object]) -> None:
    print("granq_ao fake-quant latency benchmark")
    for key in ("date", "torch", "python", "device", "device_name", "threads", "cpu_count", "loadavg",
                "granq_fused_env", "malloc"):
        if key in env:
            print(f"  {key:16s} {env[key]}")
    print(f"  {'bits':16s} {settings['bits']} (activations [0, {2**settings['bits'] - 1}])")
    print(f"  {'settings':16s} reps>={settings['reps']}, min {settings['min_time_s']} s per measurement, "
          f"granq_iterative: {settings['iterative']} x{settings['iterative_reps']}")
    sys.stdout.flush()


def run_with_recompile_limit(settings: Dict[str, object], device: torch.device, limit: int,
                             env: Dict[str, object]) -> List[Dict[str, object]]:
    """:func:`run_latency` under a torch._dynamo recompile limit of at least ``limit`` (restored
    afterwards), from fresh compiled graphs; the limit and its hits are recorded in ``env``."""
    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    log("latency (progress)")
    dynamo_config = torch._dynamo.config
    default_limit = dynamo_config.recompile_limit
    reset_compiled()
    dynamo_config.recompile_limit = max(default_limit, limit)
    try:
        with CompileFallbackCounter() as fallbacks:
            latency = run_latency(settings["batches"], settings["candidates"], settings["bits"], device,
                                  reps=settings["reps"], warmup=2, min_time_s=settings["min_time_s"], max_reps=200,
                                  iterative=settings["iterative"], iterative_reps=settings["iterative_reps"], log=log)
    finally:
        dynamo_config.recompile_limit = default_limit
    env["latency_recompile_limit"] = max(default_limit, limit)
    env["latency_compile_fallbacks"] = len(fallbacks.hits)
    return latency


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    F.quant_range(args.bits)
    settings = settings_of(args)
    env = environment(device)
    env["malloc"] = malloc_setting(args.warm_malloc)
    print_header(env, settings)
    latency = run_with_recompile_limit(settings, device, args.latency_recompile_limit, env)
    env["granq_backend"] = F.fused_backend("auto")
    print(f"  {'granq backend':16s} {env['granq_backend']} (GranQFakeQuantize fused='auto' resolved to this)")
    print("\nfake-quant latency, median ms per call; ratios vs clone and vs torch.ao FakeQuantize (same run)")
    print(format_latency_table(latency))
    print(f"(torch._dynamo recompile limit {env['latency_recompile_limit']} here; hits: "
          f"{env['latency_compile_fallbacks']}{', some compiled calls ran EAGER' if env['latency_compile_fallbacks'] else ''})")
    result = {"environment": env, "settings": settings, "latency": latency, "targets": evaluate_targets(latency)}
    if args.check:
        print("\n" + format_targets(result["targets"], f"targets (fp32, {args.bits} bits; measured in this run)"))
    if args.json:
        write_json(args.json, result)
        print(f"\nwrote {args.json}")
    if args.check and any(target["status"] == "FAIL" for target in result["targets"]):
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
