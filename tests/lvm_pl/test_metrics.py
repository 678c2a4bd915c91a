"""Batched PSNR/SSIM on [-1, 1] images against skimage.metrics on the same images."""

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from lvm_pl.metrics import psnr, ssim


def _images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 24, 20, generator=g) * 2 - 1
    ramp = torch.linspace(-1, 1, 20).expand(3, 24, 20)
    x[0] = ramp  # a smooth image next to noise
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    y[2] = x[2]  # identical pair
    return x, y


def _np01(t: torch.Tensor) -> np.ndarray:
    return ((t.double() + 1) / 2).permute(1, 2, 0).numpy()


def test_psnr_matches_skimage():
    x, y = _images()
    ours = psnr(x, y)
    for i in range(2):
        ref = peak_signal_noise_ratio(_np01(x[i]), _np01(y[i]), data_range=1.0)
        assert ours[i].item() == pytest.approx(ref, rel=1e-4)
    assert ours[2] > 100  # identical images: bounded, not inf


def test_ssim_matches_skimage():
    x, y = _images()
    ours = ssim(x, y)
    for i in range(3):
        ref = structural_similarity(
            _np01(x[i]),
            _np01(y[i]),
            data_range=1.0,
            channel_axis=2,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert ours[i].item() == pytest.approx(ref, abs=1e-5)
    assert ours[2].item() == pytest.approx(1.0)
