"""Focused timing of the issue's latency targets at (200, 16, 32, 32), fp32, ``--bits`` (3).

Candidates: the ``torch.clone`` memory-copy floor, ``GranQFakeQuantize``, torch.ao's
``FakeQuantize`` (per-tensor MovingAverageMinMaxObserver) and ``granq_iterative``; modes
``fwd``, ``fwdgrad`` (autograd.grad: as inside a network) and ``fwdbwd`` (``.backward()`` into
a leaf's ``.grad``: +1 gradient copy for everyone); see ``fake_quant_latency.py``, whose
candidates and modes this script reuses (timers and ``--warm-malloc``: :mod:`benchmarks.harness`). More rounds
than the full benchmark spends on one shape; prints median, quartiles and minimum, and the
target ratios by median and by minimum. On a shared or virtual machine, interference (other
processes, page faults of fresh 13 MB buffers, memory reclaim) only ever adds time, so the
minimum is the estimate of a call's own cost that timeit's documentation recommends; the
median says what a caller saw in this run. Page faults per call are printed beside: with
glibc's default allocator a fresh 13 MB buffer may be page-faulted in (~3,200 faults, several
ms on this VM) on some calls and reused on others; ``--warm-malloc`` removes that.

    python benchmarks/focus_fwd_bwd.py [--rounds 60] [--threads 2] [--warm-malloc]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.fake_quant_latency import MODE_TITLES, MODES, TARGET_SHAPE, make_fake_quant, mode_call  # noqa: E402
from benchmarks.harness import malloc_setting, time_calls, time_interleaved  # noqa: E402

CANDIDATES = ("clone", "granq", "torchao_fq")


def quartiles_ms(times):
    q1, q2, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
    return q1 * 1e3, q2 * 1e3, q3 * 1e3


def warm_up(fns, seconds):
    """Round-robin calls for ``seconds`` (at least 10 rounds): compilation, and the first few
    hundred ms in which the process's heap grows to its steady size (times of every candidate
    are 2-5x higher there on this machine), stay out of the timed rounds."""
    start, rounds = time.perf_counter(), 0
    while rounds < 10 or time.perf_counter() - start < seconds:
        for fn in fns.values():
            fn()
        rounds += 1


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is unavailable)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def counting_faults(fn, counts, name):
    """``fn`` that also adds the page faults of each call to ``counts[name]`` (a fresh, untouched
    13 MB buffer costs ~3,200 faults; a reused one none)."""
    def call():
        before = minor_faults()
        fn()
        counts[name] = counts.get(name, 0) + minor_faults() - before
    return call


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60, help="interleaved rounds per mode")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="untimed round-robin seconds per mode")
    parser.add_argument("--iterative-calls", type=int, default=5)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--warm-malloc", action="store_true", help="see benchmarks/harness.py (warm_malloc)")
    args = parser.parse_args(argv)
    malloc = malloc_setting(args.warm_malloc)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(TARGET_SHAPE, generator=generator)
    grad = torch.randn(TARGET_SHAPE, generator=generator)
    x_grad = x.clone().requires_grad_(True)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, malloc {malloc}, "
          f"shape {TARGET_SHAPE}, {args.bits} bits, {args.rounds} rounds")
    medians, minima = {}, {}
    for mode in MODES:
        inp = x if mode == "fwd" else x_grad
        fns = {name: mode_call(make_fake_quant(name, args.bits, cpu), inp, grad, mode)
               for name in CANDIDATES}
        warm_up(fns, args.warmup_s)
        faults = {}
        fns = {name: counting_faults(fn, faults, name) for name, fn in fns.items()}
        times = time_interleaved(fns, cpu, reps=args.rounds, warmup=0)
        iterative = mode_call(make_fake_quant("granq_iterative", args.bits, cpu), inp, grad, mode)
        iterative()  # warm-up, uncounted
        times["granq_iterative"] = time_calls(counting_faults(iterative, faults, "granq_iterative"),
                                                    cpu, reps=args.iterative_calls, warmup=0)
        print(f"\n{mode}: {MODE_TITLES[mode]}")
        for name, spent in times.items():
            q1, q2, q3 = quartiles_ms(spent)
            medians[mode, name] = q2
            minima[mode, name] = min(spent) * 1e3
            print(f"  {name:16s} median {q2:8.3f} ms   quartiles [{q1:.3f}, {q3:.3f}]   "
                  f"min {minima[mode, name]:8.3f}   n={len(spent)}   "
                  f"page faults/call {faults.get(name, 0) / len(spent):6.0f}")
        for label, table in (("median", medians), ("min", minima)):
            print(f"  by {label:6s}: granq / clone {table[mode, 'granq'] / table[mode, 'clone']:.2f}   "
                  f"granq / torchao_fq {table[mode, 'granq'] / table[mode, 'torchao_fq']:.3f}   "
                  f"granq_iterative / granq {table[mode, 'granq_iterative'] / table[mode, 'granq']:.1f}")
        sys.stdout.flush()
    return medians, minima


if __name__ == "__main__":
    main()
