"""Discriminators for the VQGAN's adversarial loss: PatchGAN (pix2pix N-layer) and a StyleGAN-style residual one.

Both take images [B, 3, H, W] in [-1, 1] and return logits ([B, 1, h, w] patches or [B, 1] per image).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels // 4), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be batch, group or none, got {kind!r}")


class PatchGAN(nn.Module):
    """pix2pix N-layer discriminator: 4x4 convs, stride 2 for `num_layers` levels, a patch of logits out."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3, norm: str = "batch"):
        """`norm: group` or `none` avoid BatchNorm's batch statistics (which couple real and fake batches)."""
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=norm == "none"),
                _norm(norm, channels * mult),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # pix2pix init: N(0, 0.02) convs, N(1, 0.02) norm scales
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class _ResBlock(nn.Module):
    """conv3x3 -> lrelu -> conv3x3 -> lrelu -> avgpool, plus an avgpool -> 1x1 skip; sum scaled by 1/sqrt(2)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, 3, padding=1)
        self.conv2 = nn.Conv2d(cin, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.conv2(F.leaky_relu(self.conv1(x), 0.2)), 0.2)
        return (F.avg_pool2d(h, 2) + self.skip(F.avg_pool2d(x, 2))) / math.sqrt(2)


class StyleGANDiscriminator(nn.Module):
    """StyleGAN2-style residual discriminator with a minibatch-stddev feature; one logit per image."""

    def __init__(self, image_size: int, in_channels: int = 3, channels: int = 64, max_channels: int = 512):
        """Downsamples by 2 until 4x4; `image_size` fixes the number of blocks."""
        super().__init__()
        blocks = int(math.log2(image_size)) - 2
        chans = [min(channels * 2**i, max_channels) for i in range(blocks + 1)]
        self.conv_in = nn.Conv2d(in_channels, chans[0], 1)
        self.blocks = nn.ModuleList(_ResBlock(chans[i], chans[i + 1]) for i in range(blocks))
        self.conv_out = nn.Conv2d(chans[-1] + 1, chans[-1], 3, padding=1)
        self.fc = nn.Linear(chans[-1] * 16, chans[-1])
        self.out = nn.Linear(chans[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.conv_in(x), 0.2)
        for block in self.blocks:
            h = block(h)
        # minibatch stddev: one channel telling the discriminator how varied the batch is (against mode collapse)
        std = h.float().std(0, unbiased=False).mean().to(h.dtype)
        h = torch.cat([h, std.expand(h.shape[0], 1, *h.shape[2:])], 1)
        h = F.leaky_relu(self.conv_out(h), 0.2)
        return self.out(F.leaky_relu(self.fc(h.flatten(1)), 0.2))  # [B, 1]
