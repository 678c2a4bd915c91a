"""Batched image-quality metrics on [-1, 1] images [B, 3, H, W], matching skimage.metrics per image."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lvm_pl.console import UserError

# torch-fidelity's InceptionV3 (the TF FID network): torch hub caches it under this name; it is never downloaded here
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


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


def inception_weights(path: str | None) -> tuple[Path | None, str]:
    """The FID Inception weights to use and, when there are none, why: an explicit `path` must exist (UserError
    otherwise); without one, torch hub's cache is looked in. Also None when torch-fidelity is not installed."""
    from lvm_pl.vqgan.perceptual import hub_checkpoint_dir

    if path is not None and not Path(path).expanduser().is_file():
        raise UserError(f"model.init_args.fid_weights={path}: no such file (torch-fidelity's {INCEPTION_FILE})")
    found = Path(path).expanduser() if path is not None else hub_checkpoint_dir() / INCEPTION_FILE
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return None, "rfid skipped: torch-fidelity is not installed"
    if not found.is_file():
        return None, (
            f"rfid skipped: FID Inception weights {found} not found (copy torch-fidelity's {INCEPTION_FILE} there,"
            " or set model.init_args.fid_weights)"
        )
    return found, ""


def frechet_inception_distance(weights: Path) -> torch.nn.Module:
    """torchmetrics' FID (2048-d pool features of the TF Inception, images in [0, 1]) on weights read from `weights`."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(weights))
