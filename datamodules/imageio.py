"""Robust image loading at the data edge: any PIL mode to uint8 RGB, bad files reported as `BadImage`.

An image over Pillow's pixel limit (`Image.MAX_IMAGE_PIXELS`, ~89 M pixels) is bad too: a few-KB file can declare
gigapixels (a decompression bomb). Pillow itself only warns below twice the limit; here it is refused from the
header, before any pixel is decoded."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class BadImage(Exception):
    """A file that is not a readable image (corrupt, truncated, empty, or another format)."""


def open_image(path: str | os.PathLike) -> Image.Image:
    """`Image.open` (header only), refusing an image whose declared size is over Pillow's pixel limit."""
    img = Image.open(path)  # over twice the limit Pillow raises DecompressionBombError itself
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and img.width * img.height > limit:
        img.close()
        raise Image.DecompressionBombError(
            f"{img.width}x{img.height} = {img.width * img.height} pixels is over Pillow's limit of {limit}"
            " (Image.MAX_IMAGE_PIXELS): a decompression bomb, or an image too large to use"
        )
    return img


def check_image(path: str | os.PathLike) -> None:
    """Decode `path` cheaply (JPEGs at 1/8 scale) to catch empty, truncated, non-image and over-limit files;
    raise `BadImage`."""
    try:
        # no warnings.catch_warnings here: it is not thread-safe and setup checks files from a thread pool
        with open_image(path) as img:
            img.draft("RGB", (1, 1))  # JPEG: decode the DCT at the smallest scale; still reads the whole stream
            img.load()
    except Exception as err:
        raise BadImage(f"{path}: {type(err).__name__}: {err}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: 16-bit/float grey scaled to 8 bits, alpha over white, CMYK and palette converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit files use the full 0..65535 range; PIL's own convert("L") would clip everything above 255
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_rgb(path: str | os.PathLike, min_side: int | None = None) -> np.ndarray:
    """Load `path` as uint8 [H, W, 3]; with `min_side`, JPEGs may decode at a reduced scale keeping both sides >= it.

    Raises `BadImage` when the file cannot be decoded or is over Pillow's pixel limit.
    """
    try:
        with open_image(path) as img:
            if min_side is not None and img.format == "JPEG":
                w, h = img.size
                scale = min_side / min(w, h)
                img.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
            return np.asarray(to_rgb(ImageOps.exif_transpose(img)))
    except Exception as err:
        raise BadImage(f"{path}: {type(err).__name__}: {err}") from None


def fit_image(image: np.ndarray, size: int, crop: tuple[float, float] = (0.5, 0.5)) -> np.ndarray:
    """Resize the shorter side to `size` (antialiased) then crop `size` x `size` at fractional offset `crop` (x, y).

    (0.5, 0.5) is the centre crop; an image already `size` x `size` is returned as is.
    """
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    scale = size / min(h, w)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    pil = Image.fromarray(image)
    if (nw, nh) != (w, h):
        pil = pil.resize((nw, nh), Image.BICUBIC, reducing_gap=2.0)
    x0, y0 = round(crop[0] * (nw - size)), round(crop[1] * (nh - size))
    return np.asarray(pil.crop((x0, y0, x0 + size, y0 + size)))
