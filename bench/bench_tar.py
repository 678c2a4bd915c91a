"""Tar shard reading, samples/s in one process: webdataset's tar iterators against the standard library's `tarfile`.

python bench/bench_tar.py [--quick]

Writes one local tar of small JPEGs (64x64, quality 90) with a JSON sidecar each, the way `make-shards --layout
image` and img2dataset store them, and reads it through fsspec as `TarSource` does: members grouped into samples by
key, (a) with `webdataset.tariterators` (what `TarSource` uses), (b) with `tarfile` in stream mode (`r|`) and our own
grouping; each once without decoding (the reader alone) and once decoding every JPEG (what a worker does). Rounds
alternate between the two so machine noise hits both alike. Results go to bench/results/bench_tar.json.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import fsspec
import numpy as np
import torch
from PIL import Image

from bench.common import figure, median, write_results
from datamodules.imageio import load_rgb
from lvm_pl.console import say


def write_tar(path: Path, count: int, size: int = 64) -> int:
    """`count` JPEG + JSON samples in one tar; returns its size in bytes."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
            sidecar = json.dumps({"sentence": f"s{i // 4}", "frame": i % 4}).encode()
            for name, data in ((f"{i:08d}.jpg", buf.getvalue()), (f"{i:08d}.json", sidecar)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path.stat().st_size


def webdataset_samples(url: str) -> Iterator[dict]:
    from webdataset.tariterators import group_by_keys, tar_file_expander

    with fsspec.open(url, "rb") as stream:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))


def tarfile_samples(url: str) -> Iterator[dict]:
    with fsspec.open(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        sample: dict = {}
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if sample and key != sample["__key__"]:
                yield sample
                sample = {}
            sample.setdefault("__key__", key)
            sample[ext] = tar.extractfile(member).read()
        if sample:
            yield sample


def read(samples: Callable[[str], Iterator[dict]], url: str, decode: bool) -> int:
    n = 0
    for sample in samples(url):
        if decode:
            load_rgb(io.BytesIO(sample["jpg"]), min_side=64)
            json.loads(sample["json"])
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few samples, few rounds (CI smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one DataLoader worker's share of the CPU
    count, rounds = (200, 2) if args.quick else (2000, 5)
    readers = {"webdataset": webdataset_samples, "tarfile": tarfile_samples}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard-000000.tar"
        size = write_tar(path, count)
        times: dict[str, list[float]] = {f"{r} {m}": [] for m in ("read", "decode") for r in readers}
        for r in range(rounds):
            for mode in ("read", "decode"):
                for name in list(readers)[r % 2 :] + list(readers)[: r % 2]:
                    start = time.perf_counter()
                    assert read(readers[name], str(path), mode == "decode") == count
                    times[f"{name} {mode}"].append(time.perf_counter() - start)
    rate = {k: count / median(v) for k, v in times.items()}
    for k, v in rate.items():
        say(f"{k}: {v:,.0f} samples/s")
    figures = [
        figure(
            f"tar {mode}: webdataset vs tarfile",
            "samples/s",
            rate[f"webdataset {mode}"],
            rate[f"tarfile {mode}"],
            "tarfile r| + own grouping",
            note=f"{count} JPEG+JSON samples of 64x64, {size:,} bytes, one process",
        )
        for mode in ("read", "decode")
    ]
    write_results("bench_tar", figures, {"samples": count, "tar_bytes": size, "samples_per_s": rate})


if __name__ == "__main__":
    main()
