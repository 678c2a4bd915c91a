"""The built-in source: offline, deterministic visual sentences with ground truth in `meta`.

Sentence `i` of a split is drawn from its own generator seeded by (seed, split, i), so it is the same bytes in any
worker or rank. The families and their kinds are the table `FAMILIES` (sequences such as `moving`, analogies such
as `edges`, categories `shapes`/`digits`, singles `photo`/`scene`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from datamodules.sources import builtin_draw as draw
from datamodules.sources.base import SPLITS, SentenceSource, VisualSentence
from lvm_pl.console import UserError
from lvm_pl.kinds import Kind

Frame = Callable[[], np.ndarray]  # renders one uint8 [H, W, 3] image; every random draw happened before


@dataclass
class LazySentence:
    """A family's output: all random draws done, frames rendered on demand (one image costs one frame)."""

    frames: list[Frame]
    meta: dict


def _then(transform: Callable[[np.ndarray], np.ndarray], frame: Frame) -> np.ndarray:
    return transform(frame())


def _shape_params(rng: np.random.Generator, size: int, shape: str | None = None) -> dict:
    r = rng.uniform(0.12, 0.25) * size
    return {
        "shape": shape or str(rng.choice(draw.SHAPES)),
        "x": float(rng.uniform(r, size - r)),
        "y": float(rng.uniform(r, size - r)),
        "r": float(r),
        "angle": float(rng.uniform(0, 2 * np.pi)),
    }


def _photo_crop(rng: np.random.Generator, size: int) -> tuple[Frame, dict]:
    name = str(rng.choice(draw.PHOTOS))
    img = draw.photo(name)
    box = draw.random_box(rng, *img.shape[:2], 0.3, 1.0)
    return partial(draw.crop_resize, img, box, size), {"photo": name, "box": list(box)}


def _scene(rng: np.random.Generator, size: int, count: int) -> tuple[Frame, list[dict], np.ndarray]:
    """A flat background with `count` shapes, far (first) to near (last); returns its frame, shapes, background."""
    bg, colours = draw.contrasting_colours(rng, count)
    depths = np.sort(rng.uniform(0.2, 1.0, count))  # drawn in this order, so the nearest is on top
    shapes = [
        {**_shape_params(rng, size), "colour": [int(v) for v in c], "depth": float(d)}
        for c, d in zip(colours, depths, strict=True)
    ]
    return partial(draw.render_shapes, shapes, size, bg), shapes, bg


def _bounce(start: float, velocity: float, low: float, high: float, t: int) -> tuple[float, float]:
    """Position and velocity at frame t of a point moving at `velocity` per frame between walls `low`..`high`,
    reflected at each wall (a billiard ball)."""
    span = high - low
    if span <= 0:
        return start, 0.0
    u = (start - low + velocity * t) % (2 * span)  # unfolded path, one period = there and back
    return (low + u, velocity) if u <= span else (low + 2 * span - u, -velocity)


def moving(rng: np.random.Generator, n: int, size: int, speed: tuple[float, float] | None = None) -> LazySentence:
    """1-2 shapes moving with constant velocity, staying inside the frame; meta has each one's per-frame centre and
    velocity. `speed` None: each shape travels to a random end point over the sentence; else [low, high] is its speed
    per frame as a fraction of the image size, and it bounces off the frame's edges."""
    count = int(rng.integers(1, 3))
    bg, colours = draw.contrasting_colours(rng, count)
    objects, frames = [], []
    for c in colours:
        s = _shape_params(rng, size)
        start = np.array([s["x"], s["y"]])
        if speed is None:
            end = np.array([rng.uniform(s["r"], size - s["r"]), rng.uniform(s["r"], size - s["r"])])
            velocity = (end - start) / max(n - 1, 1)
            path = [(start + velocity * t, velocity) for t in range(n)]
        else:
            heading = rng.uniform(0, 2 * np.pi)
            velocity = rng.uniform(*speed) * size * np.array([np.cos(heading), np.sin(heading)])
            axes = [[_bounce(start[a], velocity[a], s["r"], size - s["r"], t) for a in (0, 1)] for t in range(n)]
            path = [(np.array([x[0], y[0]]), np.array([x[1], y[1]])) for x, y in axes]
        objects.append(
            {
                **s,
                "colour": [int(v) for v in c],
                "velocity": velocity.tolist(),
                "positions": [p.tolist() for p, _ in path],
                "velocities": [v.tolist() for _, v in path],
            }
        )
    for t in range(n):
        at_t = [{**o, "x": o["positions"][t][0], "y": o["positions"][t][1]} for o in objects]
        frames.append(partial(draw.render_shapes, at_t, size, bg))
    return LazySentence(frames, {"objects": objects, "background": bg.tolist()})


def rotating(rng: np.random.Generator, n: int, size: int) -> LazySentence:
    """A shape turning at a constant angular speed; meta has the per-frame angle (radians)."""
    bg, (c,) = draw.contrasting_colours(rng, 1)
    s = _shape_params(rng, size, str(rng.choice(["square", "triangle", "cross"])))
    s["r"] = float(rng.uniform(0.25, 0.4) * size)
    s["x"] = s["y"] = size / 2
    omega = float(rng.choice([-1, 1]) * rng.uniform(np.pi / 18, np.pi / 6))
    angles = [s["angle"] + omega * t for t in range(n)]
    frames = [partial(draw.render_shapes, [{**s, "colour": c, "angle": a}], size, bg) for a in angles]
    return LazySentence(frames, {"shape": s["shape"], "angles": angles, "omega": omega})


def scaling(rng: np.random.Generator, n: int, size: int) -> LazySentence:
    """A shape growing or shrinking linearly; meta has the per-frame radius (pixels)."""
    bg, (c,) = draw.contrasting_colours(rng, 1)
    s = _shape_params(rng, size)
    s["x"] = s["y"] = size / 2
    r0, r1 = rng.uniform(0.08, 0.45, 2) * size
    radii = [float(r0 + (r1 - r0) * t / max(n - 1, 1)) for t in range(n)]
    frames = [partial(draw.render_shapes, [{**s, "colour": c, "r": r}], size, bg) for r in radii]
    return LazySentence(frames, {"shape": s["shape"], "radii": radii})


def recolour(rng: np.random.Generator, n: int, size: int) -> LazySentence:
    """A still shape whose colour moves linearly between two colours; meta has the per-frame colour."""
    bg, (c0, c1) = draw.contrasting_colours(rng, 2)
    s = _shape_params(rng, size)
    colours = [np.round(c0 + (c1.astype(float) - c0) * t / max(n - 1, 1)).astype(np.uint8) for t in range(n)]
    frames = [partial(draw.render_shapes, [{**s, "colour": c}], size, bg) for c in colours]
    return LazySentence(frames, {"shape": s["shape"], "colours": [c.tolist() for c in colours]})


def pan(rng: np.random.Generator, n: int, size: int) -> LazySentence:
    """A camera window sliding at constant speed across a photo; meta has the per-frame (x, y) of the window."""
    name = str(rng.choice(draw.PHOTOS))
    img = draw.photo(name)
    h, w = img.shape[:2]
    side = int(min(h, w) * rng.uniform(0.35, 0.6))
    start = np.array([rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)], float)
    end = np.array([rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)], float)
    offsets = [np.round(start + (end - start) * t / max(n - 1, 1)).astype(int) for t in range(n)]
    frames = [partial(draw.crop_resize, img, (int(x), int(y), side), size) for x, y in offsets]
    return LazySentence(frames, {"photo": name, "side": side, "offsets": [o.tolist() for o in offsets]})


def gif(rng: np.random.Generator, n: int, size: int) -> LazySentence:
    """Consecutive frames of scikit-image's animated GIF under one random crop; meta has the frame numbers."""
    all_frames = draw.gif_frames()
    n = min(n, len(all_frames))
    start = int(rng.integers(0, len(all_frames) - n + 1))
    box = draw.random_box(rng, *all_frames[0].shape[:2], 0.75, 1.0)
    frames = [partial(draw.crop_resize, f, box, size) for f in all_frames[start : start + n]]
    return LazySentence(frames, {"frames": list(range(start, start + n)), "box": list(box)})


def _transform_analogy(name: str):
    def family(rng: np.random.Generator, n: int, size: int) -> LazySentence:
        """Pairs x -> T(x) with one transform T; sources are photo crops or shape scenes."""
        images, sources = [], []
        for _ in range(n // 2):
            if rng.random() < 0.5:
                x, info = _photo_crop(rng, size)
            else:
                x, shapes, _ = _scene(rng, size, int(rng.integers(1, 4)))
                info = {"shapes": shapes}
            images += [x, partial(_then, draw.TRANSFORMS[name], x)]
            sources.append(info)
        return LazySentence(images, {"transform": name, "sources": sources})

    family.__name__ = name
    return family


def segmentation(rng: np.random.Generator, n: int, size: int) -> LazySentence:
    """Pairs shape scene -> flat class-coloured segmentation (`builtin_draw.SEGMENT_COLOURS`); meta has the shapes."""
    images, scenes = [], []
    for _ in range(n // 2):
        x, shapes, bg = _scene(rng, size, int(rng.integers(1, 5)))
        images += [x, partial(draw.render_segmentation, shapes, size)]
        scenes.append({"shapes": shapes, "background": bg.tolist()})
    return LazySentence(images, {"transform": "segmentation", "scenes": scenes})


def depth(rng: np.random.Generator, n: int, size: int) -> LazySentence:
    """Pairs of stacked shapes -> depth map (nearer brighter, background black); meta has the shapes and depths."""
    images, scenes = [], []
    for _ in range(n // 2):
        x, shapes, bg = _scene(rng, size, int(rng.integers(2, 5)))
        images += [x, partial(draw.render_depth, shapes, size)]
        scenes.append({"shapes": shapes, "background": bg.tolist()})
    return LazySentence(images, {"transform": "depth", "scenes": scenes})


def stereo(rng: np.random.Generator, n: int, size: int) -> LazySentence:
    """Pairs of the same crop of scikit-image's stereo left view -> its disparity map (brighter is nearer)."""
    left, disparity = draw.stereo_pair()
    images, boxes = [], []
    for _ in range(n // 2):
        box = draw.random_box(rng, *left.shape[:2], 0.3, 1.0)
        images += [partial(draw.crop_resize, left, box, size), partial(draw.crop_resize, disparity, box, size)]
        boxes.append(list(box))
    return LazySentence(images, {"transform": "stereo_disparity", "boxes": boxes})


def shapes(rng: np.random.Generator, n: int, size: int) -> LazySentence:
    """Several images of one shape class, each with its own colours, size, position and angle."""
    cls = str(rng.choice(draw.SHAPES))
    images = []
    for _ in range(n):
        bg, (c,) = draw.contrasting_colours(rng, 1)
        images.append(partial(draw.render_shapes, [{**_shape_params(rng, size, cls), "colour": c}], size, bg))
    return LazySentence(images, {"class": cls})


def digits(rng: np.random.Generator, n: int, size: int) -> LazySentence:
    """Several different handwritten samples of one digit (scikit-learn), each with its own colours, scale, place."""
    pixels, labels = draw.digits()
    cls = int(rng.integers(0, 10))
    picks = rng.choice(np.flatnonzero(labels == cls), n, replace=False)
    images = []
    for k in picks:
        bg, (c,) = draw.contrasting_colours(rng, 1)
        side = int(size * rng.uniform(0.5, 0.95))
        x, y = rng.integers(0, size - side + 1, 2)
        images.append(partial(draw.render_digit, pixels[k], size, side, int(x), int(y), bg, c))
    return LazySentence(images, {"class": cls, "samples": picks.tolist()})


def photo(rng: np.random.Generator, n: int, size: int) -> LazySentence:
    """A random square crop of a scikit-image photo."""
    x, info = _photo_crop(rng, size)
    return LazySentence([x], info)


def scene(rng: np.random.Generator, n: int, size: int) -> LazySentence:
    """A synthetic scene of 1-5 stacked shapes."""
    x, shape_list, bg = _scene(rng, size, int(rng.integers(1, 6)))
    return LazySentence([x], {"shapes": shape_list, "background": bg.tolist()})


# The families, each with its kind: the one table the source, the docs and the tests read
FAMILIES: dict[str, tuple[Kind, Callable[..., LazySentence]]] = {
    "moving": ("sequence", moving),
    "rotating": ("sequence", rotating),
    "scaling": ("sequence", scaling),
    "recolour": ("sequence", recolour),
    "pan": ("sequence", pan),
    "gif": ("sequence", gif),
    **{name: ("analogy", _transform_analogy(name)) for name in draw.TRANSFORMS},
    "segmentation": ("analogy", segmentation),
    "depth": ("analogy", depth),
    "stereo": ("analogy", stereo),
    "shapes": ("category", shapes),
    "digits": ("category", digits),
    "photo": ("single", photo),
    "scene": ("single", scene),
}
FAMILY_KINDS: dict[str, Kind] = {name: kind for name, (kind, _) in FAMILIES.items()}


class BuiltinSource(SentenceSource):
    """Synthetic and scikit-image/scikit-learn sentences; nothing is downloaded.

    `weights` maps family names to mixing weights (missing families are off; None: all equal). `splits` gives the
    number of sentences per split. Lengths are inclusive [low, high] ranges: frames of a sequence, x -> T(x) pairs
    of an analogy, images of a category. `moving_speed` [low, high] (fraction of the image size per frame) makes the
    `moving` shapes keep that speed and bounce off the edges; null: each crosses to a random end point over the
    sentence (slow in long sentences).
    """

    def __init__(
        self,
        weights: dict[str, float] | None = None,
        splits: dict[str, int] | None = None,
        sequence_length: tuple[int, int] = (2, 16),
        analogy_pairs: tuple[int, int] = (1, 4),
        category_size: tuple[int, int] = (2, 8),
        moving_speed: tuple[float, float] | None = None,
    ) -> None:
        weights = dict.fromkeys(FAMILIES, 1.0) if weights is None else dict(weights)
        splits = {"train": 256, "val": 32, "test": 32} if splits is None else dict(splits)
        unknown = sorted(set(weights) - set(FAMILIES))
        if unknown:
            raise UserError(f"data.source.weights: unknown families {unknown}; known: {sorted(FAMILIES)}")
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise UserError(f"data.source.weights: {weights} must be non-negative with a positive sum")
        bad_splits = sorted(set(splits) - set(SPLITS))
        if bad_splits or any(v < 0 for v in splits.values()):
            raise UserError(f"data.source.splits: {splits} must map {list(SPLITS)} to counts >= 0")
        for key, (lo, hi), least in (
            ("sequence_length", sequence_length, 2),
            ("analogy_pairs", analogy_pairs, 1),
            ("category_size", category_size, 2),
        ):
            if not least <= lo <= hi:
                raise UserError(f"data.source.{key}: [{lo}, {hi}] must satisfy {least} <= low <= high")
        if moving_speed is not None and not 0 <= moving_speed[0] <= moving_speed[1]:
            raise UserError(f"data.source.moving_speed: {list(moving_speed)} must satisfy 0 <= low <= high")
        if category_size[1] > 150:  # the rarest digit class has ~170 samples, drawn without repeats
            raise UserError(f"data.source.category_size: high {category_size[1]} must be <= 150")
        self.names = [k for k, w in weights.items() if w > 0]
        w = np.array([weights[k] for k in self.names], float)
        self.probs = w / w.sum()
        self.splits = splits
        self.lengths = {"sequence": sequence_length, "category": category_size}
        self.analogy_pairs = analogy_pairs
        # keyword options per family, kept as plain data (no closures): the source is pickled to spawned workers
        self.family_options = {"moving": {"speed": moving_speed}}
        self.image_size = 0
        self.seed = 0

    def setup(self, image_size: int, seed: int) -> None:
        self.image_size, self.seed = image_size, seed

    def split_size(self, split: str) -> int:
        return self.splits.get(split, 0)

    def plan(self, split: str, index: int) -> tuple[str, int, np.random.Generator]:
        """Family, number of images and the generator (positioned after those draws) of sentence `index`."""
        if not 0 <= index < self.split_size(split):
            raise IndexError(f"{split}[{index}] outside a split of {self.split_size(split)} sentences")
        rng = np.random.default_rng([self.seed, SPLITS.index(split), index])
        family = self.names[int(rng.choice(len(self.names), p=self.probs))]
        kind = FAMILY_KINDS[family]
        if kind == "analogy":
            n = 2 * int(rng.integers(self.analogy_pairs[0], self.analogy_pairs[1] + 1))
        elif kind == "single":
            n = 1
        else:
            lo, hi = self.lengths[kind]
            n = int(rng.integers(lo, hi + 1))
        if family == "gif":
            n = min(n, len(draw.gif_frames()))
        return family, n, rng

    def num_images(self, split: str, index: int) -> int:
        return self.plan(split, index)[1]

    def lazy(self, split: str, index: int) -> LazySentence:
        """Sentence `index` of `split` with its frames not yet rendered."""
        family, n, rng = self.plan(split, index)
        s = FAMILIES[family][1](rng, n, self.image_size, **self.family_options.get(family, {}))
        s.meta.update(family=family, split=split, index=index)
        return s

    def sentence(self, split: str, index: int) -> VisualSentence:
        s = self.lazy(split, index)
        return VisualSentence([frame() for frame in s.frames], FAMILY_KINDS[s.meta["family"]], s.meta)

    def image(self, split: str, index: int, position: int) -> tuple[np.ndarray, str]:
        s = self.lazy(split, index)
        return s.frames[position](), FAMILY_KINDS[s.meta["family"]]

    def describe(self, split: str, index: int) -> str:
        return f"builtin {split}[{index}] ({self.plan(split, index)[0]})"
