"""Focused forward+backward timing at the issue's shape (200, 16, 32, 32), 3 bits, fp32.

Candidates: the ``torch.clone`` memory-copy floor, ``GranQFakeQuantize``, torch.ao's
``FakeQuantize`` (per-tensor MovingAverageMinMaxObserver) and ``granq_iterative``. Calls are
interleaved (one of each per round) and ``x.grad`` is reset before every call, so no
13 MB gradient accumulation or allocator effect lands on one candidate only. Prints medians
and the ratios the issue's targets name. Complements ``fake_quant_latency.py``; see
docs/RESULTS.md.

    python benchmarks/focus_fwd_bwd.py [--rounds 60] [--threads 2]
"""
import argparse
import time
import warnings

import torch
import torch.ao.quantization as tq

from granq_ao.fake_quantize import GranQFakeQuantize


def median_ms(times):
    return sorted(times)[len(times) // 2] * 1e3


def time_fwd_bwd(op, x, grad):
    x.grad = None
    start = time.perf_counter()
    op(x).backward(grad)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--iterative-calls", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.relu(torch.randn(200, 16, 32, 32)).requires_grad_()
    grad = torch.randn_like(x)
    candidates = {
        "clone": torch.clone,
        "granq": GranQFakeQuantize(bits=3),
        "torchao_fq": tq.FakeQuantize(observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=7),
    }
    for _ in range(10):  # warm-up (includes GranQ's one-time compile)
        for op in candidates.values():
            time_fwd_bwd(op, x, grad)
    times = {name: [] for name in candidates}
    for _ in range(args.rounds):
        for name, op in candidates.items():
            times[name].append(time_fwd_bwd(op, x, grad))
    medians = {name: median_ms(t) for name, t in times.items()}
    iterative = GranQFakeQuantize(bits=3, granularity="granq_iterative")
    medians["granq_iterative"] = median_ms([time_fwd_bwd(iterative, x, grad)
                                            for _ in range(args.iterative_calls)])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, shape {tuple(x.shape)}, 3 bits")
    for name, value in medians.items():
        print(f"{name:16s} fwd+bwd median {value:8.3f} ms")
    print(f"granq / clone {medians['granq'] / medians['clone']:.2f}   "
          f"granq / torchao_fq {medians['granq'] / medians['torchao_fq']:.3f}   "
          f"granq_iterative / granq {medians['granq_iterative'] / medians['granq']:.1f}")


if __name__ == "__main__":
    main()
