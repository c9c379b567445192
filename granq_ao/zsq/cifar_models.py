"""Model definitions of the CIFAR teachers in ``../shared/data`` other than pytorchcv's ResNet-20.

Written from the topology descriptions in ``shared/data/SOURCES.md`` (the sources ship weights only);
each definition's parameter and buffer names are the checkpoint's, so ``load_state_dict(strict=True)``
checks the topology.

* :class:`ResNetCifarA` -- He et al.'s CIFAR ResNet-(6n+2) with "option A" shortcuts: a stride-2
  block's shortcut is ``pad(x[:, :, ::2, ::2])`` with ``planes // 4`` zero channels on each side
  (no parameters). Depths 20/32/44/56 (n = 3/5/7/9).
* :class:`MobileNetV2Cifar` -- MobileNetV2 with a width multiplier (0.5 here) and CIFAR strides:
  inverted residual blocks ``[1x1 expand -> BN -> ReLU6] -> 3x3 depthwise -> BN -> ReLU6 -> 1x1
  project -> BN`` (+ identity when the shape is kept).
* :class:`ResNet8Tiny` -- MLPerf Tiny's ResNet-8 (converted from Keras): biased convs, BN eps 1e-3,
  1x1-conv shortcuts without BN, Keras "same" padding on stride-2 3x3 convs (pad right/bottom by 1),
  raw 0..255 pixel input.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ResNetCifarA", "MobileNetV2Cifar", "ResNet8Tiny", "make_divisible"]


# ----------------------------------------------------------------------------- ResNet, option A
class _PadShortcut(nn.Module):
    """``x[:, :, ::2, ::2]`` zero-padded with ``pad`` channels before and after (option A)."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class _BasicBlockA(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_planes != planes:
            self.shortcut = _PadShortcut(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCifarA(nn.Module):
    """CIFAR ResNet-``depth`` (``depth = 6n + 2``) with zero-padding shortcuts (module docstring).
    Keys: ``conv1, bn1, layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}, linear``."""

    def __init__(self, depth: int = 20, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"depth must be 6n + 2 (20, 32, 44, 56, ...), got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            layers = []
            for index in range(blocks):
                layers.append(_BasicBlockA(in_planes, planes, stride if index == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(self.pool(out), 1))


# ----------------------------------------------------------------------------- MobileNetV2
def make_divisible(value: float, divisor: int = 8) -> int:
    """The usual MobileNet rounding: the nearest multiple of ``divisor``, at least ``divisor``,
    and never more than 10% below ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, relu6: bool = True
             ) -> List[nn.Module]:
    layers: List[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(out_ch)]
    return layers + [nn.ReLU6()] if relu6 else layers


class _InvertedResidual(nn.Module):
    """``conv`` = [expand 1x1 -> BN -> ReLU6] -> depthwise 3x3 -> BN -> ReLU6 -> project 1x1 -> BN;
    output ``x + conv(x)`` when stride 1 and channels are kept, else ``conv(x)``."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        layers = _conv_bn(in_ch, hidden, 1) if expansion != 1 else []
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        layers += _conv_bn(hidden, out_ch, 1, relu6=False)
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


# (expansion t, channels c, repeats n, first stride s) of Sandler et al., Table 2, CIFAR strides.
MOBILENETV2_SETTINGS: Tuple[Tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2Cifar(nn.Module):
    """MobileNetV2 for 32x32 images (module docstring): stem 3x3 conv stride 1, the 17 blocks of
    :data:`MOBILENETV2_SETTINGS` with channels ``make_divisible(c * width)``, head 1x1 conv to
    ``make_divisible(1280 * width)`` channels, global average pool, ``Linear``. Keys:
    ``stem.{0,1}, blocks.{i}.conv.{j}, head.{0,1}, linear``."""

    def __init__(self, width: float = 0.5, num_classes: int = 10,
                 settings: Sequence[Tuple[int, int, int, int]] = MOBILENETV2_SETTINGS) -> None:
        super().__init__()
        in_ch = make_divisible(32 * width)
        self.stem = nn.Sequential(*_conv_bn(3, in_ch, 3))
        blocks = []
        for expansion, channels, repeats, stride in settings:
            out_ch = make_divisible(channels * width)
            for index in range(repeats):
                blocks.append(_InvertedResidual(in_ch, out_ch, stride if index == 0 else 1, expansion))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        head_ch = make_divisible(1280 * width)
        self.head = nn.Sequential(*_conv_bn(in_ch, head_ch, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(head_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.blocks(self.stem(x)))
        return self.linear(torch.flatten(self.pool(out), 1))


# ----------------------------------------------------------------------------- ResNet-8 (MLPerf Tiny)
class _KerasSamePad(nn.Module):
    """Keras "same" padding of a stride-2 3x3 conv on an even input: 0 left/top, 1 right/bottom."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 1, 0, 1))


class _TinyStack(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; stride-2 stacks have a 1x1-conv
    shortcut (bias, no BN) and pad their first conv the Keras way."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        eps = 1e-3
        self.pad = _KerasSamePad() if stride == 2 else nn.Identity()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=0 if stride == 2 else 1)
        self.bn1 = nn.BatchNorm2d(out_ch, eps=eps)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_ch, eps=eps)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride) if stride != 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(self.pad(x))))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class _TinyStem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16, eps=1e-3)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class ResNet8Tiny(nn.Module):
    """MLPerf Tiny's CIFAR-10 ResNet-8 (module docstring). Takes raw pixels (0..255 floats).
    Keys: ``stem.{conv,bn}, stack{1,2,3}.{conv1,bn1,conv2,bn2}, stack{2,3}.shortcut, fc``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _TinyStem()
        self.stack1 = _TinyStack(16, 16, 1)
        self.stack2 = _TinyStack(16, 32, 2)
        self.stack3 = _TinyStack(32, 64, 2)
        self.pool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stack3(self.stack2(self.stack1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(out), 1))
