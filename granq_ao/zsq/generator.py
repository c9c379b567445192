"""The conditional generators of GDFQ, AdaDFQ and GranQ: :class:`GDFQGenerator` (CIFAR, 32x32)
and :class:`ImageNetGenerator` (ImageNet, 224x224, class-conditional batch normalization).

CIFAR, :class:`GDFQGenerator`, ``G(z, y)``, for a latent ``z`` (N, latent_dim) and labels ``y`` (N,)::

    h = Embedding(num_classes, latent_dim)(y) * z                 # label-conditioned latent
    h = Linear(latent_dim, 128 * s * s)(h).view(N, 128, s, s)      # s = img_size // 4 (8 for CIFAR)
    h = BN(128)(h);  h = upsample_x2(h)                            # nearest neighbour
    h = LeakyReLU(0.2)(BN(128, eps=0.8)(Conv3x3(128 -> 128)(h)));  h = upsample_x2(h)
    h = LeakyReLU(0.2)(BN(64, eps=0.8)(Conv3x3(128 -> 64)(h)))
    x = BN(channels, affine=False)(tanh(Conv3x3(64 -> channels)(h)))

The last BN (batch statistics in train mode) puts the images in roughly the normalized space the
teacher expects, so ``x`` goes to the teacher directly. A teacher that takes another input space
(raw pixels, other statistics) gets ``x * output_std + output_mean`` instead: the constructor's
``output_stats=(mean, std)`` per channel (see :func:`granq_ao.zsq.data.generator_output_statistics`),
kept as buffers ``output_mean``/``output_std``. The generator is always used in train
mode (batch statistics), as in the official code; its running statistics are never used.

ImageNet, :class:`ImageNetGenerator` (the official ImageNet code's generator): the label enters
through class-conditional batch normalization instead of multiplying ``z``::

    CBN_k(h, y) = gamma_k[y] * BN(h) + beta_k[y]      # BN without affine; gamma, beta = Embedding(classes, C)
    h = Linear(latent_dim, 128 * s * s)(z).view(N, 128, s, s)      # s = img_size // 4 (56 for 224)
    h = CBN_0(128)(h, y);  h = upsample_x2(h)
    h = LeakyReLU(0.2)(CBN_1(128, eps=0.8)(Conv3x3(128 -> 128)(h), y));  h = upsample_x2(h)
    h = LeakyReLU(0.2)(CBN_2(64, eps=0.8)(Conv3x3(128 -> 64)(h), y))
    x = BN(channels, affine=False)(tanh(Conv3x3(64 -> channels)(h)))

``gamma`` starts at 1 and ``beta`` at 0 for every class. At 224 px the Linear layer holds
100 x 128 x 56 x 56 = 40M weights (the generator is ~40M parameters, 161 MB in float32).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["GDFQGenerator", "ImageNetGenerator", "ConditionalBatchNorm2d"]


class _ConditionalGenerator(nn.Module):
    """What both generators share: the sizes (``img_size`` a multiple of 4, ``init_size =
    img_size // 4``) and how their inputs are drawn. Subclasses define ``project`` and ``forward``."""

    def __init__(self, num_classes: int, latent_dim: int, img_size: int, channels: int,
                 output_stats=None) -> None:
        super().__init__()
        if img_size % 4:
            raise ValueError(f"img_size must be a multiple of 4, got {img_size}")
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.img_size = img_size
        self.channels = channels
        self.init_size = img_size // 4
        self.has_output_stats = output_stats is not None
        if self.has_output_stats:
            mean, std = (torch.as_tensor(v, dtype=torch.float32).reshape(-1) for v in output_stats)
            if mean.numel() != channels or std.numel() != channels or not bool((std > 0).all()):
                raise ValueError(f"output_stats must be (mean, std) with {channels} values each and std > 0")
            self.register_buffer("output_mean", mean.view(1, channels, 1, 1))
            self.register_buffer("output_std", std.view(1, channels, 1, 1))

    def to_teacher_space(self, x: torch.Tensor) -> torch.Tensor:
        """``x * output_std + output_mean`` when the generator has output statistics, else ``x``."""
        return x * self.output_std + self.output_mean if self.has_output_stats else x

    def sample_inputs(self, batch_size: int, generator: Optional[torch.Generator] = None,
                      device: Optional[torch.device] = None):
        """``(z, labels)``: ``z ~ N(0, I)`` (batch, latent_dim) and uniform labels, drawn from
        ``generator`` (a ``torch.Generator`` on ``device``) in this order."""
        device = device if device is not None else self.project.weight.device
        z = torch.randn(batch_size, self.latent_dim, generator=generator, device=device)
        labels = torch.randint(0, self.num_classes, (batch_size,), generator=generator, device=device)
        return z, labels


class GDFQGenerator(_ConditionalGenerator):
    """Conditional image generator ``G(z, labels)`` (see the module docstring)."""

    def __init__(self, num_classes: int, latent_dim: int = 100, img_size: int = 32, channels: int = 3,
                 output_stats=None) -> None:
        super().__init__(num_classes, latent_dim, img_size, channels, output_stats)
        self.label_embedding = nn.Embedding(num_classes, latent_dim)
        self.project = nn.Linear(latent_dim, 128 * self.init_size ** 2)
        self.bn0 = nn.BatchNorm2d(128)
        self.conv1 = nn.Conv2d(128, 128, 3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(128, eps=0.8)
        self.conv2 = nn.Conv2d(128, 64, 3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(64, eps=0.8)
        self.conv_out = nn.Conv2d(64, channels, 3, stride=1, padding=1)
        self.bn_out = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.label_embedding(labels) * z
        h = self.project(h).view(z.shape[0], 128, self.init_size, self.init_size)
        h = F.interpolate(self.bn0(h), scale_factor=2, mode="nearest")
        h = F.leaky_relu(self.bn1(self.conv1(h)), 0.2)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = F.leaky_relu(self.bn2(self.conv2(h)), 0.2)
        return self.to_teacher_space(self.bn_out(torch.tanh(self.conv_out(h))))


class ConditionalBatchNorm2d(nn.Module):
    """``gamma[y] * BN(x) + beta[y]``: batch normalization without its own affine parameters,
    followed by a per-class scale and shift (``Embedding(num_classes, num_features)`` each,
    initialized to 1 and 0). ``eps`` and ``momentum`` are those of the inner ``BatchNorm2d``."""

    def __init__(self, num_classes: int, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_features = num_features
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=False)
        self.gamma = nn.Embedding(num_classes, num_features)
        self.beta = nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], self.num_features, 1, 1)
        return self.gamma(labels).view(shape) * self.bn(x) + self.beta(labels).view(shape)


class ImageNetGenerator(_ConditionalGenerator):
    """Class-conditional ImageNet generator ``G(z, labels)`` (see the module docstring); any
    ``img_size`` divisible by 4 (224 for ImageNet; smaller ones for quick tests)."""

    def __init__(self, num_classes: int = 1000, latent_dim: int = 100, img_size: int = 224, channels: int = 3,
                 output_stats=None) -> None:
        super().__init__(num_classes, latent_dim, img_size, channels, output_stats)
        self.project = nn.Linear(latent_dim, 128 * self.init_size ** 2)
        self.cbn0 = ConditionalBatchNorm2d(num_classes, 128)
        self.conv1 = nn.Conv2d(128, 128, 3, stride=1, padding=1)
        self.cbn1 = ConditionalBatchNorm2d(num_classes, 128, eps=0.8)
        self.conv2 = nn.Conv2d(128, 64, 3, stride=1, padding=1)
        self.cbn2 = ConditionalBatchNorm2d(num_classes, 64, eps=0.8)
        self.conv_out = nn.Conv2d(64, channels, 3, stride=1, padding=1)
        self.bn_out = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.project(z).view(z.shape[0], 128, self.init_size, self.init_size)
        h = F.interpolate(self.cbn0(h, labels), scale_factor=2, mode="nearest")
        h = F.leaky_relu(self.cbn1(self.conv1(h), labels), 0.2)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = F.leaky_relu(self.cbn2(self.conv2(h), labels), 0.2)
        return self.to_teacher_space(self.bn_out(torch.tanh(self.conv_out(h))))
