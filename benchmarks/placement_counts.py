"""Activation fake-quants per network and placement (``paper`` / ``all`` / ``inputs``), FX and PT2E.

    OMP_NUM_THREADS=1 python -m benchmarks.placement_counts            # the table of docs/PLACEMENT.md
    OMP_NUM_THREADS=1 python -m benchmarks.placement_counts --nets resnet20_cifar10 --toolchains fx

Counts call sites (a shared fake-quant counts at each call): ``granq_ao.count_activation_fake_quant_calls``
for FX (``granq_ao.prepare_qat_fx``), ``granq_fake_quant_calls(...)["activation"]`` for PT2E
(``prepare_qat_pt2e`` with ``GranQQuantizer``). ``conv/linear`` is the number of conv / transposed
conv / linear layers called in the FX graph (a layer called twice counts twice). Random weights
(nothing is downloaded); counting, not timing.
"""
from __future__ import annotations

import argparse
import copy
import warnings
from typing import Callable, Dict, Tuple

import torch

import granq_ao
from granq_ao.integrations.torch_ao.input_placement import is_weighted_call

PLACEMENTS = ("paper", "all", "inputs")


def _pytorchcv(name: str) -> torch.nn.Module:
    from pytorchcv.model_provider import get_model

    return get_model(name, pretrained=False)


def _torchvision(name: str) -> torch.nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(weights=None)


def _timm(name: str, **kwargs) -> torch.nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)


#: name -> (constructor, input shape)
NETWORKS: Dict[str, Tuple[Callable[[], torch.nn.Module], Tuple[int, ...]]] = {
    "resnet20_cifar10": (lambda: _pytorchcv("resnet20_cifar10"), (2, 3, 32, 32)),
    "resnet18": (lambda: _torchvision("resnet18"), (2, 3, 64, 64)),
    "mobilenet_v2": (lambda: _torchvision("mobilenet_v2"), (2, 3, 64, 64)),
    "mobilenet_v3_small": (lambda: _torchvision("mobilenet_v3_small"), (2, 3, 64, 64)),
    "efficientnet_b0": (lambda: _torchvision("efficientnet_b0"), (2, 3, 64, 64)),
    "convnext_tiny": (lambda: _torchvision("convnext_tiny"), (2, 3, 64, 64)),
    "timm vit_tiny_patch16_224 (img 32, patch 8)": (
        lambda: _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10), (2, 3, 32, 32)),
}


def conv_linear_calls(model: torch.fx.GraphModule) -> int:
    modules = dict(model.named_modules(remove_duplicate=False))
    return sum(is_weighted_call(node, modules) for node in model.graph.nodes)


def count_fx(model: torch.nn.Module, example: Tuple[torch.Tensor], placement: str) -> Tuple[int, int]:
    mapping = granq_ao.get_granq_qat_qconfig_mapping(4, 4, act_placement=placement)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = granq_ao.prepare_qat_fx(copy.deepcopy(model).train(), mapping, example)
    return granq_ao.count_activation_fake_quant_calls(prepared), conv_linear_calls(prepared)


def count_pt2e(model: torch.nn.Module, example: Tuple[torch.Tensor], placement: str) -> int:
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    from granq_ao.integrations.torchao import GranQQuantizer, export_for_qat, granq_fake_quant_calls

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_qat_pt2e(export_for_qat(copy.deepcopy(model), example),
                                    GranQQuantizer(weight_bits=4, act_bits=4, act_placement=placement))
    return len(granq_fake_quant_calls(prepared)["activation"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="*", default=list(NETWORKS), help="names of NETWORKS")
    parser.add_argument("--toolchains", nargs="*", default=["fx", "pt2e"], choices=["fx", "pt2e"])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    header = ["network", "conv/linear"] + [f"{tool} {placement}" for tool in args.toolchains
                                           for placement in PLACEMENTS]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in args.nets:
        build, shape = NETWORKS[name]
        model = build()
        example = (torch.randn(shape),)
        cells, layers = [], "?"
        for tool in args.toolchains:
            for placement in PLACEMENTS:
                try:
                    if tool == "fx":
                        count, layers = count_fx(model, example, placement)
                    else:
                        count = count_pt2e(model, example, placement)
                    cells.append(str(count))
                except Exception as error:  # a toolchain that cannot trace/export this network
                    cells.append(f"fails: {type(error).__name__}")
        print("| " + " | ".join([name, str(layers)] + cells) + " |", flush=True)


if __name__ == "__main__":
    main()
