"""What a converted GranQ model lowers to on CPU (Inductor, x86), measured next to torchao's int8 recipe.

pytorchcv ``resnet20_cifar10`` (random init, seed 0) in eval, batch ``--batch`` of random images:

==================  ===============================================================================
float_eager         the float model
float_compiled      ``torch.compile`` of the float model
x86_int8_compiled   torchao's x86 int8 recipe: ``X86InductorQuantizer`` (static per-tensor
                    activations, per-channel weights), ``prepare_pt2e`` + calibration on 4 batches,
                    ``convert_pt2e``, ``torch.compile`` with Inductor freezing
granq_eager         ``GranQQuantizer`` (W{b}A{b}, ``--placement``): ``prepare_qat_pt2e``, eval form,
                    ``convert_pt2e`` (explicit ``granq_ao`` dynamic q/dq ops)
granq_compiled      ``torch.compile`` of ``granq_eager`` with Inductor freezing
==================  ===============================================================================

For each converted graph: its batch-norm nodes (conv-bn folded or not) and ``granq_ao`` op
calls; for each compiled model: the operators its generated code calls (counted by name:
``onednn.qconv*`` / ``onednn.qlinear*`` are integer kernels, ``mkldnn._convolution_pointwise``
and ``extern_kernels.convolution`` float ones), its largest logit difference from the eager
model and the fraction of images whose top-1 class agrees with it (Inductor reorders float
arithmetic; at 3 bits a rounding flip moves a code by a whole level, so bit-equality is not expected).
Then latency: every row timed interleaved (one call of each per round), median of ``--rounds``.

    python benchmarks/lowering_x86.py --threads 2 --json runs/lowering.json
"""
from __future__ import annotations

import argparse
import collections
import copy
import re
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

from benchmarks.harness import run_header, write_json  # noqa: E402

warnings.filterwarnings("ignore")

# a call site in Inductor's generated Python: ``bufN = torch.ops.ns.op.overload(...)`` / ``extern_kernels.op(...)``
KERNEL_PATTERN = re.compile(r"(torch\.ops\.[A-Za-z_0-9]+\.[A-Za-z_0-9]+|extern_kernels\.[A-Za-z_0-9]+)(?:\.[A-Za-z_0-9]+)?\(")
INTEGER_KERNELS = ("onednn.qconv", "onednn.qlinear")


def resnet20() -> torch.nn.Module:
    from pytorchcv.model_provider import get_model

    torch.manual_seed(0)
    return get_model("resnet20_cifar10", pretrained=False).eval()


def x86_int8(model: torch.nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    exported = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
    prepared = prepare_pt2e(exported, X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config()))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _ in range(4):
            prepared(torch.randn(example.shape, generator=generator))
    return convert_pt2e(prepared)


def granq_converted(model: torch.nn.Module, example: torch.Tensor, bits: int, placement: str) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

    from granq_ao.config import GranQScheme
    from granq_ao.integrations.torchao import GranQQuantizer, export_for_qat

    scheme = GranQScheme.from_kwargs(bits, bits, act_placement=placement)
    prepared = prepare_qat_pt2e(export_for_qat(copy.deepcopy(model), (example[:2],)), GranQQuantizer(scheme))
    return convert_pt2e(move_exported_model_to_eval(prepared))


def graph_facts(model: torch.fx.GraphModule) -> Dict[str, int]:
    targets = [str(node.target) for node in model.graph.nodes if node.op == "call_function"]
    return {"batch_norm_nodes": sum("batch_norm" in target for target in targets),
            "granq_ao_ops": sum(target.startswith("granq_ao.") for target in targets),
            "convolution_nodes": sum("conv" in target for target in targets)}


def compile_and_inspect(model: torch.nn.Module, example: torch.Tensor) -> Dict[str, object]:
    """``torch.compile`` with freezing; the operators the generated code calls (call sites, by
    name: what runs per forward, once each), and the time to compile."""
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    started = time.perf_counter()
    with inductor_config.patch(freezing=True), torch.no_grad():
        compiled = torch.compile(model)
        _, codes = run_and_get_code(compiled, example)
    calls = collections.Counter(KERNEL_PATTERN.findall("\n".join(codes)))
    calls = {name.replace("torch.ops.", ""): count for name, count in sorted(calls.items())}
    return {"compiled": compiled, "compile_s": time.perf_counter() - started, "kernel_calls": calls,
            "integer_kernel_calls": sum(count for name, count in calls.items() if name.startswith(INTEGER_KERNELS))}


def run(batch: int = 200, bits: int = 3, placement: str = "paper", rounds: int = 10,
        log: Callable[[str], None] = print) -> Dict[str, object]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=generator)
    model = resnet20()
    rows: Dict[str, Dict[str, object]] = {}
    callables: Dict[str, Callable[[], object]] = {}

    int8 = x86_int8(copy.deepcopy(model), x[:8])
    granq = granq_converted(model, x, bits, placement)
    eager = {"float_eager": model, "granq_eager": granq}
    for name, module in eager.items():
        rows[name] = {"row": name}
        callables[name] = lambda module=module: module(x)
    rows["granq_eager"].update(graph_facts(granq))
    for name, module, reference in (("float_compiled", model, model), ("x86_int8_compiled", int8, int8),
                                    ("granq_compiled", granq, granq)):
        facts = compile_and_inspect(module, x)
        compiled = facts.pop("compiled")
        with torch.no_grad():
            compiled_out, eager_out = compiled(x), reference(x)
        difference = (compiled_out - eager_out).abs().max().item()
        agreement = (compiled_out.argmax(1) == eager_out.argmax(1)).float().mean().item()
        rows[name] = {"row": name, **facts, "max_abs_diff_vs_eager": difference, "top1_agreement_vs_eager": agreement}
        if isinstance(module, torch.fx.GraphModule):
            rows[name].update(graph_facts(module))
        callables[name] = lambda compiled=compiled: compiled(x)
        log(f"  {name}: compiled in {facts['compile_s']:.1f} s, integer kernel calls "
            f"{facts['integer_kernel_calls']}, max |compiled - eager| {difference:.3g}, top-1 agreement {agreement:.3f}")
    times: Dict[str, List[float]] = {name: [] for name in callables}
    with torch.no_grad():
        for name, call in callables.items():  # warm-up
            call()
        for round_index in range(rounds):
            for name, call in callables.items():
                started = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - started)
    for name in callables:
        rows[name].update(ms=statistics.median(times[name]) * 1e3, min_ms=min(times[name]) * 1e3)
    for row in rows.values():
        row["x_float_eager"] = row["ms"] / rows["float_eager"]["ms"]
    order = ["float_eager", "float_compiled", "x86_int8_compiled", "granq_eager", "granq_compiled"]
    return {"rows": [rows[name] for name in order], "batch": batch, "bits": bits, "placement": placement}


def format_table(result: Dict[str, object]) -> str:
    lines = ["| row | ms (median) | min ms | x float eager | integer kernel calls | BN nodes | granq_ao ops "
             "| compiled vs eager: max abs diff, top-1 agreement | kernels called by the compiled code |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        kernels = ", ".join(f"{name} x{count}" for name, count in row.get("kernel_calls", {}).items()) or "-"
        diff, agreement = row.get("max_abs_diff_vs_eager"), row.get("top1_agreement_vs_eager")
        versus = "-" if diff is None else f"{diff:.3g}, {agreement:.3f}"
        lines.append(f"| `{row['row']}` | {row['ms']:.1f} | {row['min_ms']:.1f} | {row['x_float_eager']:.2f} "
                     f"| {row.get('integer_kernel_calls', '-')} | {row.get('batch_norm_nodes', '-')} "
                     f"| {row.get('granq_ao_ops', '-')} | {versus} | {kernels} |")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--placement", choices=("all", "paper"), default="paper")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", metavar="OUT", default=None)
    args = parser.parse_args(argv)
    if args.batch < 8 or args.rounds < 1:
        parser.error("--batch must be >= 8 (calibration uses 8 images) and --rounds >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    header = run_header(f"batch {args.batch}, GranQ W{args.bits}A{args.bits} {args.placement}, "
                        f"{args.rounds} interleaved rounds")
    print(header)
    result = run(args.batch, args.bits, args.placement, args.rounds)
    result["header"] = header
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
