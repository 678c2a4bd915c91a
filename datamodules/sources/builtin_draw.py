"""Drawing primitives, analogy transforms and the offline assets (scikit-image photos, GIF, stereo pair, digits)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "cross", "ring")
# flat segmentation colours, one per shape class; background stays black
SEGMENT_COLOURS = {
    "circle": (230, 25, 75),
    "square": (60, 180, 75),
    "triangle": (0, 130, 200),
    "cross": (255, 225, 25),
    "ring": (240, 50, 230),
}
# colour photos (and a few grey textures) shipped inside the scikit-image wheel; nothing is fetched
PHOTOS = (
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_right.png",
    "retina.jpg",
    "brick.png",
    "gravel.png",
)
GIF = "no_time_for_that_tiny.gif"


def skimage_data_dir() -> Path:
    """The folder of data files inside the installed scikit-image wheel."""
    import skimage

    return Path(skimage.__file__).parent / "data"


@functools.cache
def photo(name: str, max_side: int = 320) -> np.ndarray:
    """A scikit-image photo as uint8 [H, W, 3], shrunk once so its shorter side is at most `max_side` (speed)."""
    img = Image.open(skimage_data_dir() / name).convert("RGB")
    scale = max_side / min(img.size)
    if scale < 1:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
    return np.asarray(img)


@functools.cache
def gif_frames() -> tuple[np.ndarray, ...]:
    """Every frame of scikit-image's animated GIF as uint8 [h, w, 3]."""
    frames = []
    with Image.open(skimage_data_dir() / GIF) as gif:
        for i in range(gif.n_frames):
            gif.seek(i)
            frames.append(np.asarray(gif.convert("RGB")))
    return tuple(frames)


@functools.cache
def stereo_pair() -> tuple[np.ndarray, np.ndarray]:
    """The motorcycle left view and its disparity map as uint8 [H, W, 3] (invalid disparities are black)."""
    left = np.asarray(Image.open(skimage_data_dir() / "motorcycle_left.png").convert("RGB"))
    disp = np.load(skimage_data_dir() / "motorcycle_disp.npz")["arr_0"]
    valid = np.isfinite(disp)
    grey = np.zeros(disp.shape, np.uint8)
    grey[valid] = np.round(disp[valid] / disp[valid].max() * 255).astype(np.uint8)
    return left, np.repeat(grey[..., None], 3, axis=2)


@functools.cache
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (float [N, 8, 8] in [0, 1]) and their labels [N]; shipped in the wheel."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images / 16.0, data.target


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    # pixel centres, so a symmetric shape centred at (cx, cy) has its mask centroid at (cx, cy)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return xx, yy


def shape_mask(shape: str, cx: float, cy: float, r: float, angle: float, size: int) -> np.ndarray:
    """Boolean [size, size] mask of `shape` centred at (cx, cy) (pixels), radius `r`, rotated by `angle` radians."""
    xx, yy = _grid(size)
    dx, dy = xx - cx, yy - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # coordinates in the shape's own frame
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "ring":
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "square":
        return (np.abs(u) <= 0.8 * r) & (np.abs(v) <= 0.8 * r)
    if shape == "cross":
        w = 0.33 * r
        return ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(v) <= r) & (np.abs(u) <= w))
    if shape == "triangle":
        # equilateral, centroid at the centre: inside all three edges' half-planes
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = np.pi / 2 + k * 2 * np.pi / 3  # outward normal of edge k
            inside &= u * np.cos(a) + v * np.sin(a) <= 0.5 * r
        return inside
    raise ValueError(f"unknown shape {shape!r}")


def canvas(size: int, colour: np.ndarray) -> np.ndarray:
    """A flat uint8 [size, size, 3] image."""
    return np.broadcast_to(np.asarray(colour, np.uint8), (size, size, 3)).copy()


def contrasting_colours(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A background colour and `n` object colours, each far from the background and from each other."""
    bg = rng.integers(0, 256, 3)
    colours: list[np.ndarray] = []
    while len(colours) < n:
        c = rng.integers(0, 256, 3)
        if np.abs(c - bg).sum() > 200 and all(np.abs(c - o).sum() > 120 for o in colours):
            colours.append(c)
    return bg.astype(np.uint8), [c.astype(np.uint8) for c in colours]


def crop_resize(image: np.ndarray, box: tuple[int, int, int], size: int) -> np.ndarray:
    """Crop the square (x, y, side) from `image` and resize it to `size` x `size`."""
    x, y, side = box
    pil = Image.fromarray(np.ascontiguousarray(image[y : y + side, x : x + side]))
    return np.asarray(pil.resize((size, size), Image.BICUBIC, reducing_gap=2.0))


def random_box(rng: np.random.Generator, h: int, w: int, min_frac: float, max_frac: float) -> tuple[int, int, int]:
    """A random square (x, y, side) inside an h x w image, side a fraction of the shorter side."""
    side = max(1, int(min(h, w) * rng.uniform(min_frac, max_frac)))
    return int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1)), side


# Analogy transforms: uint8 [H, W, 3] -> uint8 [H, W, 3]. The target of an analogy is exactly T(source).
def grayscale(x: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma, replicated to three channels."""
    y = np.round(x.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
    return np.repeat(np.clip(y, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def invert(x: np.ndarray) -> np.ndarray:
    """Colour inversion."""
    return 255 - x


def hflip(x: np.ndarray) -> np.ndarray:
    """Mirror left-right."""
    return np.ascontiguousarray(x[:, ::-1])


def edges(x: np.ndarray) -> np.ndarray:
    """Sobel edge magnitude of the luma, white edges on black."""
    from skimage.filters import sobel

    mag = sobel(grayscale(x)[..., 0].astype(np.float32) / 255.0)
    e = np.round(np.clip(mag * 3.0, 0, 1) * 255).astype(np.uint8)
    return np.repeat(e[..., None], 3, axis=2)


def blur(x: np.ndarray) -> np.ndarray:
    """Gaussian blur with sigma proportional to the image size (1.5 px at 64 px)."""
    from skimage.filters import gaussian

    sigma = 1.5 * x.shape[0] / 64
    y = gaussian(x.astype(np.float32), sigma=sigma, channel_axis=-1, preserve_range=True)
    return np.clip(np.round(y), 0, 255).astype(np.uint8)


TRANSFORMS = {"edges": edges, "grayscale": grayscale, "invert": invert, "hflip": hflip, "blur": blur}


def render_shapes(shapes: list[dict], size: int, background: np.ndarray) -> np.ndarray:
    """Draw `shapes` (dicts with shape, x, y, r, angle, colour) back to front on a flat background."""
    img = canvas(size, background)
    for s in shapes:
        img[shape_mask(s["shape"], s["x"], s["y"], s["r"], s["angle"], size)] = s["colour"]
    return img


def render_segmentation(shapes: list[dict], size: int) -> np.ndarray:
    """The flat segmentation of `shapes`: each shape in its class colour, background black."""
    return render_shapes([{**s, "colour": SEGMENT_COLOURS[s["shape"]]} for s in shapes], size, np.zeros(3))


def render_depth(shapes: list[dict], size: int) -> np.ndarray:
    """The depth map of stacked `shapes`: nearer is brighter, each shape flat at its own `depth` in (0, 1]."""
    grey = [{**s, "colour": (round(255 * s["depth"]),) * 3} for s in shapes]
    return render_shapes(grey, size, np.zeros(3))


def render_digit(
    digit: np.ndarray, size: int, side: int, x: int, y: int, background: np.ndarray, colour: np.ndarray
) -> np.ndarray:
    """An 8x8 digit (float in [0, 1]) scaled to `side` px at (x, y), in `colour` over a flat `background`."""
    alpha = np.asarray(Image.fromarray(digit.astype(np.float32)).resize((side, side), Image.BILINEAR))
    a = np.zeros((size, size, 1), np.float32)
    a[y : y + side, x : x + side, 0] = np.clip(alpha, 0, 1)
    return np.round(background * (1 - a) + colour * a).astype(np.uint8)
