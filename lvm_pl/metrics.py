"""Batched image-quality metrics on [-1, 1] images [B, 3, H, W], matching skimage.metrics per image."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image [B] (data range 2, i.e. the [0, 1] figure)."""
    mse = (x.float().clamp(-1, 1) - y.float().clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


def _gaussian_window(sigma: float, truncate: float, device: torch.device) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)  # scipy.ndimage's radius: 11 taps for sigma 1.5
    t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image [B]: Gaussian window (sigma 1.5), population covariances, mean over channels
    and over pixels at least one radius from the border (skimage's gaussian_weights=True on [0, 1] images)."""
    # on [0, 1]: SSIM's luminance term is not shift-invariant, and [0, 1] is the figure papers and skimage report
    x = (x.double().clamp(-1, 1) + 1) / 2
    y = (y.double().clamp(-1, 1) + 1) / 2
    c = x.shape[1]
    g = _gaussian_window(sigma, 3.5, x.device)
    kh = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
    kw = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable, 'valid': equals scipy's filter cropped by the radius
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()
