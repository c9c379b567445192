"""The zero-shot student's training step against the float step, per CIFAR teacher family, side by side.

For each architecture of ``granq_ao.zsq.teachers.CIFAR_TEACHERS`` (random init, seed 0: the cost
does not depend on the weights), rows:

==============  ===========================================================================
float           the teacher's own network, eval mode (BN frozen, as the student's), trainable
granq           the zero-shot student: ``build_student("fx", ...)`` with W{b}A{b}, GranQ
                activations, the recipe's placement (``--placement``, default paper)
granq_fold_bn   the same with ``fold_bn=True`` (conv(x, fq(w * sf)) instead of divide-then-BN)
tensor          the same student with layer-wise (per-tensor) dynamic activation ranges
==============  ===========================================================================

A step is ``zero_grad; cross_entropy(model(x), y).backward(); SGD step`` on a batch of random
images (``--batch``, default 16: the recipe's CIFAR-10 batch). Every model is built and warmed up
first, then the steps are timed **interleaved** (one step of each row per round), so that load
from other processes hits all rows alike; each time is the median over rounds. The table gives
the median ms per step and the ratio to ``float``, with the activation fake-quant calls per
forward and the depthwise convs of the network (where per-channel ranges are cheapest to need and
GranQ's overhead per FLOP is largest).

    python benchmarks/qat_step_networks.py --threads 2 --rounds 30 --json runs/qat_step_networks.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.harness import write_json  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*deprecated.*")

ROWS = ("float", "granq", "granq_fold_bn", "tensor")


def build(arch: str, row: str, bits: int, placement: str) -> torch.nn.Module:
    """The network of ``row`` for teacher architecture ``arch`` (module docstring)."""
    from granq_ao.config import GranQScheme
    from granq_ao.zsq.student import build_student
    from granq_ao.zsq.teachers import CIFAR_TEACHERS

    torch.manual_seed(0)
    teacher = CIFAR_TEACHERS[arch].build(10).eval()
    if row == "float":
        return teacher
    granularity = "tensor" if row == "tensor" else "granq"
    scheme = GranQScheme.from_kwargs(bits, bits, act_granularity=granularity, act_placement=placement, fused="eager")
    return build_student("fx", teacher, scheme, (torch.zeros(2, 3, 32, 32),), fold_bn=row == "granq_fold_bn").eval()


def depthwise_convs(model: torch.nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1
               and m.groups == m.in_channels)


def step_function(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return step


def measure(arch: str, args: argparse.Namespace) -> Dict[str, object]:
    from granq_ao.integrations.torch_ao import count_activation_fake_quant_calls

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (args.batch,), generator=generator)
    models = {row: build(arch, row, args.bits, args.placement) for row in ROWS}
    steps = {row: step_function(model, images, labels) for row, model in models.items()}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: Dict[str, List[float]] = {row: [] for row in ROWS}
    for _ in range(args.rounds):
        for row, step in steps.items():
            start = time.perf_counter()
            step()
            times[row].append(time.perf_counter() - start)
    medians = {row: 1000 * statistics.median(values) for row, values in times.items()}
    return {"arch": arch, "ms": medians, "ratio_to_float": {r: medians[r] / medians["float"] for r in ROWS},
            "activation_calls": count_activation_fake_quant_calls(models["granq"]),
            "depthwise_convs": depthwise_convs(models["float"]),
            "params": sum(p.numel() for p in models["float"].parameters())}


def format_table(rows: Sequence[Dict[str, object]]) -> str:
    head = ("| network | params | depthwise convs | act fake-quant calls | " + " | ".join(f"{r} ms" for r in ROWS)
            + " | " + " | ".join(f"{r} / float" for r in ROWS[1:]) + " |")
    lines = [head, "|" + "---|" * (4 + 2 * len(ROWS) - 1)]
    for row in rows:
        lines.append(f"| {row['arch']} | {row['params']:,} | {row['depthwise_convs']} | {row['activation_calls']} | "
                     + " | ".join(f"{row['ms'][r]:.1f}" for r in ROWS) + " | "
                     + " | ".join(f"{row['ratio_to_float'][r]:.2f}x" for r in ROWS[1:]) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    from granq_ao.zsq.teachers import CIFAR_TEACHERS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=",".join(a for a in CIFAR_TEACHERS if a not in ("resnet20a", "resnet32a", "resnet44a")),
                        help="comma-separated CIFAR_TEACHERS names")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--placement", default="paper")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    archs = [a for a in args.archs.split(",") if a]
    unknown = [a for a in archs if a not in CIFAR_TEACHERS]
    if unknown:
        parser.error(f"unknown architectures {unknown}; choose from {', '.join(CIFAR_TEACHERS)}")
    print(f"# batch {args.batch}, W{args.bits}A{args.bits}, placement {args.placement}, threads "
          f"{torch.get_num_threads()}, {args.rounds} interleaved rounds, torch {torch.__version__}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    rows = [measure(arch, args) for arch in archs]
    print(format_table(rows))
    if args.json:
        write_json(args.json, {"args": vars(args), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
