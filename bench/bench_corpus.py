"""A web-scale image corpus, in miniature per image: time to the first training batch and peak RSS per process for
tar shards (`TarSource`) and an image folder (`FolderSource` with its index file), at two corpus sizes.

python -m bench.bench_corpus [--quick] [--images 100000 1000000] [--per-shard 10000] [--where /tmp]

Every image is the same 8x8 JPEG (what is measured is listing, indexing and memory, not decoding). Each measurement
is a fresh process (forked from this one after its imports) that builds the DataModule and draws one batch of 32 (the
folder's second run reuses the index file, as every later run and every other rank does). Aims: first batch under
10 s and RSS growth over the imports under 500 MB, both the same at the small and the large size (what "independent
of the corpus size" means here).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import resource
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image

from bench.common import figure, write_results
from datamodules import VisualSentenceDataModule  # imported once here: every measurement forks from this process
from datamodules.sources.folder import FolderSource
from datamodules.sources.tar import TarSource
from lvm_pl.console import say


def first_batch(kind: str, where: str, shards: int) -> dict:
    """In a fresh child: build the DataModule and draw one batch; its seconds and its RSS growth."""
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the forked parent's pages: torch and Lightning
    start = time.perf_counter()
    if kind == "tar":
        source = TarSource(train=f"{where}/shard-{{000000..{shards - 1:06d}}}.tar")
    else:
        source = FolderSource(where, verify=1000, val_fraction=0.0, test_fraction=0.0)
    dm = VisualSentenceDataModule(source, image_size=8, unit="image", batch_size=32, num_workers=0)
    dm.setup("fit")
    next(iter(dm.train_dataloader()))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "peak_rss_mb": peak / 1024, "growth_mb": (peak - base) / 1024}


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 120, 200)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_tar(root: Path, images: int, per_shard: int) -> int:
    """`images` one-image samples in shards of `per_shard` (webdataset keys, no sidecar: single images)."""
    data, shards = jpeg(), 0
    for first in range(0, images, per_shard):
        with tarfile.open(root / f"shard-{shards:06d}.tar", "w") as tar:
            for k in range(first, min(first + per_shard, images)):
                info = tarfile.TarInfo(f"{k:09d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        shards += 1
    return shards


def make_folder(root: Path, images: int) -> None:
    """`images` loose JPEGs in `root`: each a single-image sentence (a subfolder would be one sentence)."""
    data = jpeg()
    for k in range(images):
        (root / f"{k:09d}.jpg").write_bytes(data)


def measure(kind: str, where: Path, shards: int = 0) -> dict:
    """One measurement in a process forked from this one, which has imported torch and Lightning once: a fresh
    process for what is measured (its own RSS, no state of the last run) without paying ~10 s of imports each time."""
    with multiprocessing.get_context("fork").Pool(1) as pool:
        return pool.apply(first_batch, (kind, str(where), shards))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 and 3,000 images, one folder run (CI smoke run)")
    parser.add_argument("--images", type=int, nargs=2, default=None, help="the small and the large corpus")
    parser.add_argument("--per-shard", type=int, default=10_000)
    parser.add_argument("--where", default=tempfile.gettempdir(), help="where the corpora are made (then deleted)")
    parser.add_argument("--only", choices=["tar", "folder"], default=None)
    args = parser.parse_args()
    sizes = args.images or ([1_000, 3_000] if args.quick else [100_000, 1_000_000])
    per_shard = min(args.per_shard, sizes[0])
    rows: dict[str, dict[int, dict]] = {"tar": {}, "folder": {}}
    for kind in [args.only] if args.only else ["tar", "folder"]:
        for n in sizes:
            root = Path(tempfile.mkdtemp(prefix=f"bench-corpus-{kind}-", dir=args.where))
            try:
                start = time.perf_counter()
                shards = make_tar(root, n, per_shard) if kind == "tar" else make_folder(root, n)
                made = time.perf_counter() - start
                repeats = 1 if kind == "tar" or args.quick else 2  # the folder's second run reuses its index
                runs = [measure(kind, root, shards or 0) for _ in range(repeats)]
                rows[kind][n] = {"make_s": made, "runs": runs}
                say(f"{kind} {n:,} images (made in {made:.0f} s): {json.dumps(runs)}")
            finally:
                shutil.rmtree(root)
    figures, small, large = [], sizes[0], sizes[1]
    for kind, by_size in rows.items():
        if not by_size:
            continue
        last = {n: r["runs"][-1] for n, r in by_size.items()}
        label = "tar shards" if kind == "tar" else "image folder" + ("" if args.quick else " (index reused)")
        for n in (small, large):
            figures.append(figure(f"{label}: first batch at {n:,} images", "s", last[n]["seconds"], note="aim < 10 s"))
            figures.append(figure(f"{label}: RSS growth at {n:,} images", "MB", last[n]["growth_mb"], note="aim < 500"))
        figures.append(
            figure(
                f"{label}: first batch, {large:,} vs {small:,} images",
                "s",
                last[large]["seconds"],
                last[small]["seconds"],
                f"{small:,} images",
                note="independent of size: ratio ~1",
            )
        )
        if kind == "folder" and len(by_size[large]["runs"]) == 2:
            first = by_size[large]["runs"][0]
            figures.append(figure(f"image folder: first run (builds the index) at {large:,}", "s", first["seconds"]))
    write_results("bench_corpus", figures, {"sizes": sizes, "per_shard": per_shard, "rows": rows})


if __name__ == "__main__":
    main()
