"""Image conventions at the edges: modules see float tensors in [-1, 1], shaped [B, 3, H, W]; files are uint8 RGB.

These helpers are the only conversions between the two.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


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


LABEL_CELL = 64  # labelled grids show cells at least this wide, so a header like "prompt 12" fits above its cell
BAND = 16  # px of a header or caption line in PIL's default font


def labelled_grid(
    rows: list[list[np.ndarray | None]],
    headers: dict[int, str] | None = None,
    caption: str | None = None,
    row_labels: list[str] | None = None,
    pad: int = 2,
) -> np.ndarray:
    """`grid(rows)` with `headers` {column: text} in a band above, `row_labels` in a margin on the left and `caption`
    in a band below (PIL's default font); small cells are enlarged (nearest pixel) to LABEL_CELL px so text fits."""
    cells = [c for row in rows for c in row if c is not None]
    if not cells:
        raise ValueError("grid needs at least one image")
    scale = max(1, -(-LABEL_CELL // cells[0].shape[1]))  # ceil: the smallest whole factor reaching LABEL_CELL
    big = [[None if c is None else c.repeat(scale, 0).repeat(scale, 1) for c in row] for row in rows]
    picture = grid(big, pad=pad)
    h, w = cells[0].shape[0] * scale, cells[0].shape[1] * scale
    font = ImageFont.load_default()
    left = int(max((font.getlength(t) for t in row_labels or []), default=0)) + 2 * pad if row_labels else 0
    top, bottom = BAND if headers else 0, BAND if caption else 0
    out = np.full((picture.shape[0] + top + bottom, picture.shape[1] + left, 3), 255, dtype=np.uint8)
    out[top : top + picture.shape[0], left:] = picture
    image = Image.fromarray(out, mode="RGB")
    draw = ImageDraw.Draw(image)
    for column, text in (headers or {}).items():
        draw.text((left + pad + column * (w + pad), 2), text, fill=(0, 0, 0), font=font)
    for row, text in enumerate(row_labels or []):
        draw.text((pad, top + pad + row * (h + pad) + (h - BAND) // 2), text, fill=(0, 0, 0), font=font)
    if caption:
        draw.text((pad, out.shape[0] - BAND + 2), caption, fill=(60, 60, 60), font=font)
    return np.asarray(image)
