"""Measure: the same float model through torch.ao FX QAT and through modelopt, GranQ W4A4.

Run:  python benchmarks/modelopt_compare_fx.py        (CPU, a few seconds; docs/MODELOPT.md quotes it)

Both paths use paper placement, per-(n, c) activations and per-output-channel weights, in eval
mode, on the same inputs. Printed per model: max |fx - modelopt| and max |fx| over the logits.

1. ``relu_net``: conv-relu, conv-F.relu, conv-relu6, avgpool, flatten, linear (no BN, no
   residual): the quantized computation is the same, so the outputs must be bit-equal.
2. ``resnet20 (BN folded)``: pytorchcv resnet20 (random weights, BN statistics randomized) with
   every BN folded into its conv first (FX would fold it before the weight fake-quant; modelopt
   keeps BN apart). Still not the same computation: FX's fake-quant sits on the ReLU *output*,
   so the residual add also receives the quantized tensor; modelopt quantizes layer *inputs*, so
   the residual add receives the float one. This measures how far apart that makes them.
"""
from __future__ import annotations

import copy
import os
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.utils.fusion import fuse_conv_bn_eval  # noqa: E402

os.environ.setdefault("GRANQ_FUSED", "eager")
warnings.filterwarnings("ignore")

import modelopt.torch.quantization as mtq  # noqa: E402

import granq_ao  # noqa: E402
from granq_ao.integrations.modelopt import granq_quant_cfg  # noqa: E402
from granq_ao.zsq.teachers import get_model  # noqa: E402


class ReluNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.relu = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(8, 8, 1)
        self.relu6 = torch.nn.ReLU6()
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = self.relu6(self.conv3(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def folded_resnet20() -> torch.nn.Module:
    """resnet20 with randomized BN statistics, each BN folded into the conv before it."""
    model = get_model("resnet20_cifar10").eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    for module in list(model.modules()):
        if hasattr(module, "conv") and isinstance(getattr(module, "bn", None), torch.nn.BatchNorm2d):
            module.conv = fuse_conv_bn_eval(module.conv, module.bn)
            module.bn = torch.nn.Identity()
    return model


def compare(name: str, float_model: torch.nn.Module, x: torch.Tensor, tests) -> None:
    mapping = granq_ao.get_granq_qat_qconfig_mapping(4, 4, act_placement="paper", fused="eager")
    fx = granq_ao.prepare_qat_fx(copy.deepcopy(float_model).train(), mapping, (x,)).eval()
    config = granq_quant_cfg(4, act_bits=4, act_placement="paper", fused="eager", model=float_model,
                             example_inputs=x)
    mo = mtq.quantize(copy.deepcopy(float_model), config, forward_loop=None).eval()
    with torch.no_grad():
        for t in tests:
            a, b = fx(t), mo(t)
            print(f"{name} batch {t.shape[0]}: max |fx - modelopt| = {float((a - b).abs().max()):.3g}, "
                  f"max |fx| = {float(a.abs().max()):.3g}, bit-equal: {torch.equal(a, b)}, "
                  f"same argmax: {float((a.argmax(1) == b.argmax(1)).float().mean()):.0%} of {t.shape[0]}")


def main() -> None:
    torch.manual_seed(0)
    compare("relu_net", ReluNet(), torch.randn(4, 3, 8, 8), [torch.randn(7, 3, 8, 8), torch.randn(2, 3, 5, 5) * 50])
    torch.manual_seed(0)
    compare("resnet20 (BN folded)", folded_resnet20(), torch.randn(2, 3, 32, 32), [torch.randn(64, 3, 32, 32)])


if __name__ == "__main__":
    main()
