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
fx_ao_x86_fused        the same with ``FusedMovingAvgObsFakeQuantize``, the class torch.ao's x86
                       default actually uses
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

Peak step memory (``--memory``, after the timed rounds, one step per row):
:func:`benchmarks.harness.peak_step_bytes` (CPU: the torch.profiler's allocation events, tensor
bytes allocated during the step above what was live before it; CUDA: ``max_memory_allocated``).
``--check`` prints the issue's QAT targets (FX GranQ step time <= 1.1x and peak memory <= 1x
torch.ao's fake-quant, ``fx_ao_x86``) and exits 1 if one fails.

    python benchmarks/qat_step_toolchains.py --threads 2 --json runs/qat_step.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.harness import (check_targets, fmt, format_targets, peak_step_bytes, run_header,  # noqa: E402
                                write_json)
from granq_ao.config import quant_range  # noqa: E402

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
    "fx_ao_x86_fused": "the same with FusedMovingAvgObsFakeQuantize (torch.ao's x86 default class)",
    "pt2e_x86_int8": "torchao X86InductorQuantizer(is_qat=True): int8, static per-tensor acts",
    "quantize_intx": "torchao QATConfig int8 per-token acts + int4 weights: nn.Linear only",
}
FX_PARTNER = {"pt2e_granq_all": "fx_granq_all", "quantize_granq": "fx_granq_all",
              "pt2e_granq_paper": "fx_granq_paper"}


def resnet20() -> torch.nn.Module:
    from pytorchcv.model_provider import get_model

    torch.manual_seed(0)
    return get_model("resnet20_cifar10", pretrained=False).train()


def torchao_qat_mapping(bits: int, fused: bool = False):
    """torch.ao's x86 default QAT mapping with its global qconfig on ``bits``-bit ranges:
    activations per-tensor affine on [0, 2^b - 1], weights per-channel symmetric on
    [-2^(b-1), 2^(b-1) - 1]; ``FakeQuantize`` or (``fused``) ``FusedMovingAvgObsFakeQuantize``."""
    from torch.ao.quantization import (FakeQuantize, MovingAverageMinMaxObserver,
                                       MovingAveragePerChannelMinMaxObserver, QConfig,
                                       get_default_qat_qconfig_mapping)
    from torch.ao.quantization.fake_quantize import FusedMovingAvgObsFakeQuantize

    cls = FusedMovingAvgObsFakeQuantize if fused else FakeQuantize
    a_min, a_max = quant_range(bits)
    w_min, w_max = quant_range(bits, symmetric=True)
    qconfig = QConfig(
        activation=cls.with_args(observer=MovingAverageMinMaxObserver, quant_min=a_min, quant_max=a_max,
                                 dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=False),
        weight=cls.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=w_min,
                             quant_max=w_max, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                             ch_axis=0),
    )
    return get_default_qat_qconfig_mapping("x86").set_global(qconfig)


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
    if row.startswith("fx_ao_x86"):
        from torch.ao.quantization.quantize_fx import prepare_qat_fx

        return prepare_qat_fx(model, torchao_qat_mapping(bits, fused=row == "fx_ao_x86_fused"), (example,))
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


class TrainingStep:
    """One SGD training step of ``model`` on a fixed batch (cross-entropy), returning the loss."""

    def __init__(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.model, self.images, self.labels = model, images, labels
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def clear_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, zero_grad: bool = True) -> float:
        if zero_grad:
            self.clear_grads()
        loss = torch.nn.functional.cross_entropy(self.model(self.images), self.labels)
        loss.backward()
        self.optimizer.step()
        return loss.item()


def prepare_row(row: str, bits: int, images: torch.Tensor, labels: torch.Tensor, warmup: int,
                log: Callable[[str], None]):
    """Build ``row``'s model and take ``warmup`` steps: ``(step, entry)``, the row's
    :class:`TrainingStep` and its table entry (counts, first loss)."""
    started = time.perf_counter()
    model = build(row, bits, images[:2].clone())
    step = TrainingStep(model, images, labels)
    first_loss = step()
    for _ in range(warmup - 1):
        step()
    entry = {"row": row, "what": ROWS[row], **count_quantizers(model), "first_loss": first_loss,
             "build_and_warmup_s": time.perf_counter() - started}
    log(f"  built {row:18s} in {entry['build_and_warmup_s']:6.1f} s: {entry['weights']} weights, "
        f"{entry['act_calls']} activation calls, first loss {first_loss:.6f}")
    return step, entry


def add_ratios(table: Sequence[Dict[str, object]]) -> None:
    """Step time (and peak memory) of each row over float, torch.ao's fake-quant and FX GranQ."""
    by_row = {entry["row"]: entry for entry in table}
    for entry in table:
        for key, other in (("x_float", "float"), ("x_fx_ao_x86", "fx_ao_x86"), ("x_fx_granq", FX_PARTNER.get(entry["row"]))):
            entry[key] = entry["step_ms"] / by_row[other]["step_ms"] if other in by_row else None
        reference = by_row.get("fx_ao_x86", {}).get("peak_mib")
        if "peak_mib" in entry:
            entry["peak_x_fx_ao_x86"] = entry["peak_mib"] / reference if reference else None


def run(rows: Sequence[str], bits: int = 3, batch: int = 200, rounds: int = 10, warmup: int = 3,
        memory: bool = False, log: Callable[[str], None] = print) -> List[Dict[str, object]]:
    """Build every row, warm it up, then time ``rounds`` interleaved steps (module docstring);
    with ``memory``, then the peak memory of one more step of each row."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    steps, table = {}, []
    for row in rows:
        steps[row], entry = prepare_row(row, bits, images, labels, warmup, log)
        table.append(entry)
    times: Dict[str, List[float]] = {row: [] for row in rows}
    for round_index in range(rounds):
        for row in rows:
            started = time.perf_counter()
            steps[row]()
            times[row].append(time.perf_counter() - started)
        log(f"  round {round_index + 1}/{rounds}")
    for entry in table:
        spent = times[entry["row"]]
        entry.update(step_ms=statistics.median(spent) * 1e3, min_ms=min(spent) * 1e3, rounds=len(spent))
        if memory:
            step = steps[entry["row"]]
            step.clear_grads()
            entry["peak_mib"] = peak_step_bytes(lambda: step(zero_grad=False), torch.device("cpu")) / 2**20
    add_ratios(table)
    return table


def evaluate_targets(table: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
    """The issue's QAT targets (``--check``): FX GranQ (both placements) step time <= 1.1x and
    peak step memory <= 1x torch.ao's fake-quant (``fx_ao_x86``); n/a where not measured."""
    by_row = {entry["row"]: entry for entry in table}
    specs = []
    for placement in ("all", "paper"):
        entry = by_row.get(f"fx_granq_{placement}", {})
        specs += [(f"ResNet-20 QAT step time, fx_granq_{placement} / fx_ao_x86", entry.get("x_fx_ao_x86"), "<=", 1.1),
                  (f"ResNet-20 QAT peak step memory, fx_granq_{placement} / fx_ao_x86",
                   entry.get("peak_x_fx_ao_x86"), "<=", 1.0)]
    return check_targets(specs)


def format_table(table: Sequence[Dict[str, object]]) -> str:
    def ratio(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.2f}"

    memory = any("peak_mib" in entry for entry in table)
    lines = ["| row | step ms (median) | min ms | x float | x torch.ao x86 FQ | x FX GranQ | weights | act calls "
             "| first loss |" + (" peak MiB | x torch.ao x86 FQ |" if memory else "") + " what |",
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if memory else "") + "---|"]
    for entry in table:
        peak = (f" {fmt(entry.get('peak_mib'), '.1f')} | {ratio(entry.get('peak_x_fx_ao_x86'))} |" if memory else "")
        lines.append(f"| `{entry['row']}` | {entry['step_ms']:.1f} | {entry['min_ms']:.1f} | {ratio(entry['x_float'])} "
                     f"| {ratio(entry['x_fx_ao_x86'])} | {ratio(entry['x_fx_granq'])} | {entry['weights']} "
                     f"| {entry['act_calls']} | {entry['first_loss']:.6f} |{peak} {entry['what']} |")
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
    parser.add_argument("--memory", action="store_true", help="also the peak memory of one step per row")
    parser.add_argument("--check", action="store_true",
                        help="print the issue's QAT targets (implies --memory) and exit 1 if one fails")
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
    if args.threads:
        torch.set_num_threads(args.threads)
    header = run_header(f"batch {args.batch}, W{args.bits}A{args.bits}, {args.rounds} interleaved rounds")
    print(header)
    table = run(args.rows, args.bits, args.batch, args.rounds, args.warmup, memory=args.memory or args.check)
    print(format_table(table))
    targets = evaluate_targets(table)
    if args.check:
        print("\n" + format_targets(targets, f"targets (W{args.bits}A{args.bits}; measured in this run)"))
    if args.json:
        write_json(args.json, {"header": header, "rows": table, "targets": targets})
    if args.check and any(target["status"] == "FAIL" for target in targets):
        raise SystemExit(1)
    return table


if __name__ == "__main__":
    main()
