"""Data path speed, images/s in one process (= per DataLoader worker): folder JPEG decode + resize, built-in source.

python bench/bench_data.py [--quick]

The folder part writes photo-crop JPEGs (quality 90) to a temp dir, once at 256x256 (decode only) and once at
512x384 (decode at reduced scale + resize + crop to 256), and reads them through `VisualSentenceDataModule`'s image
dataset in shuffled order, as training does. The built-in part times the default mix (configs/data/builtin.yaml's
weights) at 64 and 256 px, also shuffled (an image of a long sentence costs the whole sentence). Results go to
bench/results/bench_data.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from datamodules.sentences import VisualSentenceDataModule
from datamodules.sources import builtin_draw as draw
from datamodules.sources.builtin import BuiltinSource
from datamodules.sources.folder import FolderSource
from lvm_pl.atomic import write_json
from lvm_pl.console import say

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("BENCH_RESULTS_DIR", ROOT / "bench" / "results")) / "bench_data.json"


def images_per_s(dm: VisualSentenceDataModule, split: str, min_seconds: float) -> float:
    """Shuffled `__getitem__` rate of `split`'s image dataset, timed for at least `min_seconds`."""
    data = dm.dataset(split)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        data[order[count % len(order)]]
        count += 1
    return count / (time.perf_counter() - start)


def bench_folder(count: int, width: int, height: int, min_seconds: float) -> dict:
    """JPEGs of `width` x `height` -> 256 px images."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(count):
            img = draw.photo(str(rng.choice(draw.PHOTOS)))
            box = draw.random_box(rng, *img.shape[:2], 0.5, 1.0)
            crop = draw.crop_resize(img, box, max(width, height))[:height, :width]
            Image.fromarray(np.ascontiguousarray(crop)).save(f"{tmp}/{k:05d}.jpg", quality=90)
        source = FolderSource(tmp, val_fraction=0.0, test_fraction=0.0, verify=False)
        dm = VisualSentenceDataModule(source, image_size=256)
        return {"images_per_s": images_per_s(dm, "train", min_seconds), "files": count, "jpeg": f"{width}x{height}"}


def bench_builtin(image_size: int, min_seconds: float) -> dict:
    """The default built-in mix at `image_size`."""
    cfg = yaml.safe_load((ROOT / "configs/data/builtin.yaml").read_text())
    args = cfg["data"]["init_args"]["source"]["init_args"]
    source = BuiltinSource(**{**args, "splits": {"train": 2000}})
    dm = VisualSentenceDataModule(source, image_size=image_size, max_images=cfg["data"]["init_args"]["max_images"])
    return {"images_per_s": images_per_s(dm, "train", min_seconds), "image_size": image_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few files, short timing (CI smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one worker's share of the CPU
    seconds, files = (1.0, 50) if args.quick else (5.0, 400)
    results = {
        "folder_jpeg_256": bench_folder(files, 256, 256, seconds),
        "folder_jpeg_512x384_to_256": bench_folder(files, 512, 384, seconds),
        "builtin_64": bench_builtin(64, seconds),
        "builtin_256": bench_builtin(256, seconds),
    }
    for name, r in results.items():
        say(f"{name}: {r['images_per_s']:.0f} images/s per worker")
    # rows of `python -m bench`'s table (schema: bench/common.py figure()); no reference, no aim
    figures = [
        {"name": f"data {name} images/s per worker", "unit": "images/s", "ours": r["images_per_s"]}
        for name, r in results.items()
    ]
    write_json(RESULTS, {**results, "figures": figures})


if __name__ == "__main__":
    main()
