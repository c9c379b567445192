"""Compare GranQ QAT through torchao PT2E with the torch.ao FX path on the CIFAR-10 ResNet-20 teacher.

    python benchmarks/compare_torchao_fx.py [--images 512] [--no-convert]

For each placement (paper, all) and bit width (W4A4, W3A3): the same float teacher is prepared
with ``granq_ao.prepare_qat_fx(get_granq_qat_qconfig_mapping(scheme))`` and with
``prepare_qat_pt2e(export_for_qat(...), GranQQuantizer(scheme))``; both in eval form are run on
the same real test images. Prints the max |logit difference|, whether the logits are equal bit
for bit, and each model's top-1 accuracy on the images. Then ``convert_pt2e`` of the paper W4A4
model against its QAT eval form. Needs ../shared/data (or GRANQ_DATA_DIR). No timing.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torchao.quantization.pt2e import move_exported_model_to_eval  # noqa: E402
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e  # noqa: E402

import granq_ao  # noqa: E402
from granq_ao.config import GranQScheme  # noqa: E402
from granq_ao.integrations.torchao import GranQQuantizer, export_for_qat, granq_fake_quant_calls  # noqa: E402
from granq_ao.zsq.data import load_cifar_test  # noqa: E402
from granq_ao.zsq.teachers import build_cifar_teacher  # noqa: E402


def logits(model, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="first N CIFAR-10 test images")
    parser.add_argument("--no-convert", action="store_true", help="skip convert_pt2e (~20 s of CPU)")
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher, source = build_cifar_teacher("cifar10", allow_download=False)
    evalset = load_cifar_test("cifar10")
    images, labels = evalset.images[:args.images], evalset.labels[:args.images]
    print(f"teacher: {source}; images: {len(images)} CIFAR-10 test images")
    print("| placement | bits | act fake-quants FX / PT2E | max abs diff | bit-equal | top-1 FX | top-1 PT2E |")
    print("|---|---|---|---|---|---|---|")
    kept = None
    for placement in ("paper", "all"):
        for bits in (4, 3):
            scheme = GranQScheme.from_kwargs(bits, bits, act_placement=placement, fused="eager")
            fx = granq_ao.prepare_qat_fx(copy.deepcopy(teacher).train(),
                                         granq_ao.get_granq_qat_qconfig_mapping(scheme), (images[:2],)).eval()
            pt2e = prepare_qat_pt2e(export_for_qat(copy.deepcopy(teacher), (images[:2],)), GranQQuantizer(scheme))
            move_exported_model_to_eval(pt2e)
            a, b = logits(fx, images), logits(pt2e, images)
            top1 = [(out.argmax(1) == labels).float().mean().item() for out in (a, b)]
            print(f"| {placement} | W{bits}A{bits} | {granq_ao.count_activation_fake_quant_calls(fx)} / "
                  f"{len(granq_fake_quant_calls(pt2e)['activation'])} | {(a - b).abs().max().item():.3g} | "
                  f"{torch.equal(a, b)} | {top1[0]:.4f} | {top1[1]:.4f} |")
            if (placement, bits) == ("paper", 4):
                kept = (pt2e, b)
    if not args.no_convert:
        pt2e, expected = kept
        converted = convert_pt2e(copy.deepcopy(pt2e))
        out = logits(converted, images)
        print(f"convert_pt2e (paper W4A4) vs QAT eval: bit-equal {torch.equal(out, expected)}, "
              f"max abs diff {(out - expected).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
