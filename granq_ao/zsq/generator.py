"""The GDFQ conditional generator used by GDFQ, AdaDFQ and GranQ for CIFAR (32x32 images).

``G(z, y)``, for a latent ``z`` (N, latent_dim) and labels ``y`` (N,)::

    h = Embedding(num_classes, latent_dim)(y) * z                 # label-conditioned latent
    h = Linear(latent_dim, 128 * s * s)(h).view(N, 128, s, s)      # s = img_size // 4 (8 for CIFAR)
    h = BN(128)(h);  h = upsample_x2(h)                            # nearest neighbour
    h = LeakyReLU(0.2)(BN(128, eps=0.8)(Conv3x3(128 -> 128)(h)));  h = upsample_x2(h)
    h = LeakyReLU(0.2)(BN(64, eps=0.8)(Conv3x3(128 -> 64)(h)))
    x = BN(channels, affine=False)(tanh(Conv3x3(64 -> channels)(h)))

The last BN (batch statistics in train mode) puts the images in roughly the normalized space the
teacher expects, so ``x`` goes to the teacher directly. The generator is always used in train
mode (batch statistics), as in the official code; its running statistics are never used.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["GDFQGenerator"]


class GDFQGenerator(nn.Module):
    """Conditional image generator ``G(z, labels)`` (see the module docstring)."""

    def __init__(self, num_classes: int, latent_dim: int = 100, img_size: int = 32, channels: int = 3) -> None:
        super().__init__()
        if img_size % 4:
            raise ValueError(f"img_size must be a multiple of 4, got {img_size}")
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.img_size = img_size
        self.channels = channels
        self.init_size = img_size // 4
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
        return self.bn_out(torch.tanh(self.conv_out(h)))

    def sample_inputs(self, batch_size: int, generator: Optional[torch.Generator] = None,
                      device: Optional[torch.device] = None):
        """``(z, labels)``: ``z ~ N(0, I)`` (batch, latent_dim) and uniform labels, drawn from
        ``generator`` (a ``torch.Generator`` on ``device``) in this order."""
        device = device if device is not None else self.project.weight.device
        z = torch.randn(batch_size, self.latent_dim, generator=generator, device=device)
        labels = torch.randint(0, self.num_classes, (batch_size,), generator=generator, device=device)
        return z, labels
