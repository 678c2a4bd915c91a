"""Image conventions at the edges: modules see float tensors in [-1, 1], shaped [B, 3, H, W]; files are uint8 RGB.

These helpers are the only conversions between the two.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_tensor(image: np.ndarray | Image.Image) -> torch.Tensor:
    """uint8 [H, W, 3] array or RGB PIL image -> float32 [3, H, W] in [-1, 1]."""
    arr = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [..., 3, H, W] in [-1, 1] -> uint8 [..., H, W, 3] (values outside the range are clipped)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    return np.moveaxis(x, -3, -1)


def to_pil(image: torch.Tensor | np.ndarray) -> Image.Image:
    """One image ([3, H, W] float in [-1, 1], or uint8 [H, W, 3]) -> PIL RGB image."""
    arr = to_uint8(image) if isinstance(image, torch.Tensor) else image
    return Image.fromarray(arr, mode="RGB")


def grid(rows: list[list[np.ndarray | None]], pad: int = 2, background: int = 255) -> np.ndarray:
    """Tile uint8 [H, W, 3] images into rows (None leaves a blank cell); all images share one size."""
    cells = [c for row in rows for c in row if c is not None]
    if not cells:
        raise ValueError("grid needs at least one image")
    h, w = cells[0].shape[:2]
    ncols = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, ncols * (w + pad) + pad, 3), background, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            if cell is not None:
                y, x = pad + i * (h + pad), pad + j * (w + pad)
                out[y : y + h, x : x + w] = cell
    return out


def with_headers(picture: np.ndarray, headers: dict[int, str], cell: int, pad: int = 2) -> np.ndarray:
    """A `grid` picture with a white band on top holding `headers` {column: text} (PIL's default font), each text
    starting above its column; `cell` is the grid's cell width."""
    band = 14
    out = np.full((picture.shape[0] + band, picture.shape[1], 3), 255, dtype=np.uint8)
    out[band:] = picture
    image = Image.fromarray(out, mode="RGB")
    draw = ImageDraw.Draw(image)
    for column, text in headers.items():
        draw.text((pad + column * (cell + pad), 1), text, fill=(0, 0, 0))
    return np.asarray(image)
