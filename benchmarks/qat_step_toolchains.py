"""One ResNet-20 QAT training step through each toolchain, side by side in one run.

pytorchcv ``resnet20_cifar10`` (random init, seed 0), a batch of random CIFAR-shaped images,
``W{b}A{b}`` (default 3) where the toolchain takes a bit width. Rows:

=====================  ===================================================================================
float                  no quantization
fx_granq_all / _paper  ``granq_ao.prepare_qat_fx`` + ``get_granq_qat_qconfig_mapping(b, b, act_placement=)``
pt2e_granq_all/_paper  ``torch.export`` + torchao ``prepare_qat_pt2e(GranQQuantizer(scheme))`` (training form)
quantize_granq         torchao ``quantize_(model, GranQQATConfig(scheme), filter_fn=is_conv_or_linear)``
                       (eager module swap, placement all, no conv-bn fusion)
fx_ao_x86              torch.ao ``prepare_qat_fx`` with its x86 default QAT mapping on b-bit ranges
                       (per-tensor ``FakeQuantize`` + moving-average observers; per-channel weights)
pt2e_x86_int8          torchao's own conv-net QAT: ``X86InductorQuantizer`` with
                       ``get_default_x86_inductor_quantization_config(is_qat=True)`` (int8 static
                       per-tensor activations, int8 per-channel weights: no bit-width option)
quantize_intx          torchao's own ``QATConfig``: int8 per-token dynamic activations + int4 weights
                       (group 32), the ``Int8DynamicActivationInt4Weight`` scheme; it swaps
                       ``nn.Linear`` only, so on ResNet-20 it quantizes the classifier (1 of 22 layers)
=====================  ===================================================================================

A step is ``zero_grad; cross_entropy(model(x), y).backward(); SGD step``. Every model is built
and warmed up first (torch.compile of GranQ's fused kernel happens there), then the steps are
timed **interleaved**, one step of each row per round, so that load from other processes hits
all rows alike; each time is the median over rounds. Columns: median ms, min ms, the ratio to
``float``, to ``fx_ao_x86`` (torch.ao's own fake-quant) and, for GranQ rows, to the FX GranQ
row of the same placement; quantized layers (weights) and activation fake-quant calls; the loss
of the first step (the same weights and images in every row: the GranQ rows of one placement
agree to float rounding; conv-bn QAT is written differently by FX and PT2E).

    python benchmarks/qat_step_toolchains.py --threads 2 --json runs/qat_step.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*deprecated.*")
warnings.filterwarnings("ignore", category=UserWarning, module=r"torchao")

ROWS: Dict[str, str] = {
    "float": "no quantization",
    "fx_granq_all": "granq_ao.prepare_qat_fx, placement all",
    "fx_granq_paper": "granq_ao.prepare_qat_fx, placement paper (ReLU outputs)",
    "pt2e_granq_all": "torchao prepare_qat_pt2e + GranQQuantizer, placement all",
    "pt2e_granq_paper": "torchao prepare_qat_pt2e + GranQQuantizer, placement paper",
    "quantize_granq": "torchao quantize_ + GranQQATConfig (eager swap, all)",
    "fx_ao_x86": "torch.ao prepare_qat_fx, x86 default QAT mapping on b-bit ranges",
    "pt2e_x86_int8": "torchao X86InductorQuantizer(is_qat=True): int8, static per-tensor acts",
    "quantize_intx": "torchao QATConfig int8 per-token acts + int4 weights: nn.Linear only",
}
FX_PARTNER = {"pt2e_granq_all": "fx_granq_all", "quantize_granq": "fx_granq_all",
              "pt2e_granq_paper": "fx_granq_paper"}


def resnet20() -> torch.nn.Module:
    from pytorchcv.model_provider import get_model

    torch.manual_seed(0)
    return get_model("resnet20_cifar10", pretrained=False).train()


def granq_scheme(bits: int, placement: str):
    from granq_ao.config import GranQScheme

    return GranQScheme.from_kwargs(bits, bits, act_placement=placement)


def build(row: str, bits: int, example: torch.Tensor) -> torch.nn.Module:
    """The model of ``row`` (see the module docstring), in training form."""
    model = resnet20()
    if row == "float":
        return model
    if row.startswith("fx_granq_"):
        import granq_ao

        mapping = granq_ao.get_granq_qat_qconfig_mapping(granq_scheme(bits, row.rsplit("_", 1)[1]))
        return granq_ao.prepare_qat_fx(model, mapping, (example,))
    if row == "fx_ao_x86":
        from fake_quant_latency import torchao_qat_mapping
        from torch.ao.quantization.quantize_fx import prepare_qat_fx

        return prepare_qat_fx(model, torchao_qat_mapping(bits), (example,))
    if row.startswith("pt2e_"):
        from torchao.quantization.pt2e import move_exported_model_to_train
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

        from granq_ao.integrations.torchao import GranQQuantizer, export_for_qat

        if row == "pt2e_x86_int8":
            from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
                X86InductorQuantizer, get_default_x86_inductor_quantization_config)
            quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=True))
        else:
            quantizer = GranQQuantizer(granq_scheme(bits, row.rsplit("_", 1)[1]))
        return move_exported_model_to_train(prepare_qat_pt2e(export_for_qat(model, (example,)), quantizer))
    if row == "quantize_granq":
        from torchao.quantization import quantize_

        from granq_ao.integrations.torchao import GranQQATConfig, is_conv_or_linear

        quantize_(model, GranQQATConfig(granq_scheme(bits, "all")), filter_fn=is_conv_or_linear)
        return model
    if row == "quantize_intx":
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

        activation = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
        weight = IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True)
        quantize_(model, QATConfig(activation_config=activation, weight_config=weight, step="prepare"))
        return model
    raise ValueError(f"unknown row {row!r}; expected one of {', '.join(ROWS)}")


def count_quantizers(model: torch.nn.Module) -> Dict[str, int]:
    """Quantized weights and activation fake-quant calls, whatever the toolchain: PT2E/FX graph
    calls of a fake-quant module (torch.ao's or torchao's ``FakeQuantizeBase``; a call whose input
    depends on no graph input is a weight's), plus eager modules' own weight/input fake-quants."""
    from torch.ao.quantization.fake_quantize import FakeQuantizeBase as AoFakeQuantize
    from torchao.quantization.pt2e import FakeQuantizeBase as PT2EFakeQuantize

    from granq_ao.integrations.torchao.patterns import reaches_placeholder

    fake_quant_types = (AoFakeQuantize, PT2EFakeQuantize)
    counts = {"weights": 0, "act_calls": 0}
    graph = getattr(model, "graph", None)
    if graph is not None:
        modules = dict(model.named_modules(remove_duplicate=False))
        for node in graph.nodes:
            if node.op == "call_module" and isinstance(modules.get(str(node.target)), fake_quant_types):
                counts["act_calls" if reaches_placeholder(node.args[0]) else "weights"] += 1
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("weight_fake_quant", "weight_fake_quantizer") and module is not None:
            counts["weights"] += 1
        elif leaf in ("input_fake_quant", "activation_fake_quantizer") and module is not None:
            counts["act_calls"] += 1
    return counts


def run(rows: Sequence[str], bits: int = 3, batch: int = 200, rounds: int = 10, warmup: int = 3,
        log: Callable[[str], None] = print) -> List[Dict[str, object]]:
    """Build every row, warm it up, then time ``rounds`` interleaved steps (module docstring)."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    steps: Dict[str, Callable[[], float]] = {}
    results: Dict[str, Dict[str, object]] = {}
    for row in rows:
        started = time.perf_counter()
        model = build(row, bits, images[:2].clone())
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step(model=model, optimizer=optimizer) -> float:
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            return loss.item()

        first_loss = step()
        for _ in range(warmup - 1):
            step()
        steps[row] = step
        results[row] = {"row": row, "what": ROWS[row], **count_quantizers(model), "first_loss": first_loss,
                        "times": [], "build_and_warmup_s": time.perf_counter() - started}
        log(f"  built {row:18s} in {results[row]['build_and_warmup_s']:6.1f} s: {results[row]['weights']} weights, "
            f"{results[row]['act_calls']} activation calls, first loss {first_loss:.6f}")
    for round_index in range(rounds):
        for row in rows:
            started = time.perf_counter()
            steps[row]()
            results[row]["times"].append(time.perf_counter() - started)
        log(f"  round {round_index + 1}/{rounds}")
    table = []
    for row in rows:
        times = results[row].pop("times")
        results[row].update(step_ms=statistics.median(times) * 1e3, min_ms=min(times) * 1e3, rounds=len(times))
        table.append(results[row])
    by_row = {entry["row"]: entry for entry in table}
    for entry in table:
        for key, other in (("x_float", "float"), ("x_fx_ao_x86", "fx_ao_x86"), ("x_fx_granq", FX_PARTNER.get(entry["row"]))):
            entry[key] = entry["step_ms"] / by_row[other]["step_ms"] if other in by_row else None
    return table


def format_table(table: Sequence[Dict[str, object]]) -> str:
    def ratio(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = ["| row | step ms (median) | min ms | x float | x torch.ao x86 FQ | x FX GranQ | weights | act calls "
             "| first loss | what |", "|---|---|---|---|---|---|---|---|---|---|"]
    for entry in table:
        lines.append(f"| `{entry['row']}` | {entry['step_ms']:.1f} | {entry['min_ms']:.1f} | {ratio(entry['x_float'])} "
                     f"| {ratio(entry['x_fx_ao_x86'])} | {ratio(entry['x_fx_granq'])} | {entry['weights']} "
                     f"| {entry['act_calls']} | {entry['first_loss']:.6f} | {entry['what']} |")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=lambda text: [value for value in text.split(",") if value], default=list(ROWS),
                        help=f"comma-separated subset of: {', '.join(ROWS)}")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", metavar="OUT", default=None)
    args = parser.parse_args(argv)
    unknown = [row for row in args.rows if row not in ROWS]
    if unknown:
        parser.error(f"unknown rows {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    if args.rounds < 1 or args.warmup < 1 or args.batch < 2:
        parser.error("--rounds and --warmup must be >= 1 and --batch >= 2")
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    args = parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # fake_quant_latency's mapping, report helpers
    from report import run_header, write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    header = run_header(f"batch {args.batch}, W{args.bits}A{args.bits}, {args.rounds} interleaved rounds")
    print(header)
    table = run(args.rows, args.bits, args.batch, args.rounds, args.warmup)
    print(format_table(table))
    if args.json:
        write_json(args.json, {"header": header, "rows": table})
    return table


if __name__ == "__main__":
    main()
