#!/usr/bin/env python
"""Figure 5 of the paper from the latency benchmark's JSON: quantization latency vs batch size for the four
activation methods (layer-wise ``tensor``, channel-wise ``channel``, the iterative per-(sample, channel)
``granq_iterative`` and GranQ ``granq``), each as a ratio to the memory-copy floor (``clone``) measured in
the same run, same shape and mode.

    python benchmarks/fake_quant_latency.py --threads 2 --warm-malloc --json runs/latency.json
    python benchmarks/figure5.py runs/latency.json --out docs/figures/figure5_cpu.png

(on a GPU: ``--device cuda`` in the first command). One panel per activation shape family
``(N, 16, 32, 32)``, ``(N, 32, 16, 16)``, ``(N, 64, 8, 8)``; ``--mode`` picks the timed operation:
``fwd`` (the paper's figure: quantization is a forward op; default), ``fwdgrad`` (forward + backward as
inside a network) or ``fwdbwd`` (into a leaf). The y axis is logarithmic (the iterative method is
tens of times slower). Points the JSON lacks (``granq_iterative`` is timed on every shape only with
``--iterative all``, the benchmark's default outside ``--quick``) are left out. The table printed
below the plot lists ``median ms`` and ``x clone`` per point.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

METHODS = ("tensor", "channel", "granq_iterative", "granq")
LABELS = {"tensor": "layer-wise", "channel": "channel-wise", "granq_iterative": "iterative (per-(n,c) loop)",
          "granq": "GranQ (vectorized)"}
MODES = ("fwd", "fwdgrad", "fwdbwd")


def series(report: Dict[str, object], mode: str = "fwd"
           ) -> Dict[Tuple[int, ...], Dict[str, List[Tuple[int, float, float]]]]:
    """``{(C, H, W): {method: [(batch, ratio to clone, median ms), ...] sorted by batch}}``."""
    rows = report["latency"]
    clone = {tuple(r["shape"]): r[f"{mode}_ms"] for r in rows if r["candidate"] == "clone"}
    out: Dict[Tuple[int, ...], Dict[str, List[Tuple[int, float, float]]]] = {}
    for r in rows:
        if r["candidate"] not in METHODS or r.get(f"{mode}_ms") is None:
            continue
        shape = tuple(r["shape"])
        if shape not in clone:
            continue
        family = out.setdefault(shape[1:], {})
        family.setdefault(r["candidate"], []).append((shape[0], r[f"{mode}_ms"] / clone[shape], r[f"{mode}_ms"]))
    for family in out.values():
        for points in family.values():
            points.sort()
    return out


def plot(report: Dict[str, object], path: Path, mode: str = "fwd") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = series(report, mode)
    families = sorted(data, key=lambda shape: shape[0])
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.6), squeeze=False)
    colors = {"tensor": "tab:red", "channel": "tab:orange", "granq_iterative": "tab:gray", "granq": "tab:blue"}
    env = report.get("environment", {})
    for ax, family in zip(axes[0], families):
        for method in METHODS:
            points = data[family].get(method)
            if not points:
                continue
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=colors[method],
                    label=LABELS[method])
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", lw=0.8, ls=":")
        ax.set_title(f"(N, {', '.join(map(str, family))})", fontsize=9)
        ax.set_xlabel("batch size N")
        ax.set_ylabel(f"{mode} latency / clone (same run)")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Fake-quant latency vs batch, ratio to the copy floor; {env.get('device', '?')} "
                 f"{env.get('device_name', '')}, {env.get('threads', '?')} threads, {env.get('date', '')}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(report: Dict[str, object], mode: str = "fwd") -> str:
    data = series(report, mode)
    lines = [f"| shape | method | " + " | ".join(f"N={n}" for n in _batches(data)) + " |",
             "|---|---|" + "---|" * len(_batches(data))]
    for family in sorted(data, key=lambda shape: shape[0]):
        for method in METHODS:
            points = {p[0]: p for p in data[family].get(method, [])}
            cells = [f"{points[n][2]:.3f} ms ({points[n][1]:.2f}x)" if n in points else "n/a" for n in _batches(data)]
            lines.append(f"| (N, {', '.join(map(str, family))}) | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _batches(data) -> List[int]:
    return sorted({p[0] for family in data.values() for points in family.values() for p in points})


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="output of benchmarks/fake_quant_latency.py --json")
    parser.add_argument("--mode", choices=MODES, default="fwd")
    parser.add_argument("--out", default=None, help="PNG path (default: next to the JSON, figure5_<mode>.png)")
    args = parser.parse_args(argv)
    report = json.loads(Path(args.json).read_text())
    if not report.get("latency"):
        parser.error(f"{args.json} holds no latency rows")
    out = Path(args.out) if args.out else Path(args.json).with_name(f"figure5_{args.mode}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(report, out, args.mode)
    print(format_table(report, args.mode))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
