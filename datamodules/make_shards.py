"""`make-shards`: the sentences of any data config written as WebDataset-style tar shards, the form `TarSource` reads
(and img2dataset writes), per split, local or on object storage; nothing partial is left when it fails."""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from itertools import islice
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from datamodules.preview import load_datamodule
from datamodules.sources.base import SPLITS, VisualSentence
from datamodules.sources.remote import filesystem, remote_error
from lvm_pl.atomic import atomic_dir
from lvm_pl.console import UserError, say


def make_shards(
    configs: list[str],
    output_dir: str,
    per_shard: int = 1000,
    layout: Literal["sentence", "image"] = "sentence",
    image_format: Literal["png", "jpg"] = "png",
    jpeg_quality: int = 95,
    splits: list[str] | None = None,
    overrides: list[str] | None = None,
) -> list[str]:
    """Write each split's sentences to `<output_dir>/<split>/shard-000000.tar, ...`; returns the split folders.

    Args:
        configs: the data config(s) (`-c a.yaml -c b.yaml`; only their `data:` sections are read).
        output_dir: a local folder or a URL (`s3://bucket/prefix`); a split folder that holds files already is refused.
        per_shard: sentences per shard (a sentence never spans two shards).
        layout: `sentence`: one sample per sentence (`<key>.0.png`, `<key>.1.png`, ... and `<key>.json` with its
            kind); `image`: one sample per image with a `<key>.json` sidecar naming its sentence and frame.
        image_format: `png` keeps the pixels exactly; `jpg` is smaller (photos).
        jpeg_quality: JPEG quality with `image_format: jpg`.
        splits: splits to write (train, val, test); default: every split the data has sentences in.
        overrides: `--data.*` flags on top of the configs, e.g. `--data.init_args.source.init_args.root=photos`.
    """
    if per_shard < 1 or not 1 <= jpeg_quality <= 100:
        raise UserError(f"--per_shard={per_shard} must be >= 1 and --jpeg_quality={jpeg_quality} in 1..100")
    for split in splits or ():
        if split not in SPLITS:
            raise UserError(f"--splits: unknown split {split!r}; the splits are {', '.join(SPLITS)}")
    data = load_datamodule(configs, overrides or [])
    splits = splits or [split for split in SPLITS if data.has_split(split)]
    encode = {"png": {"format": "PNG"}, "jpg": {"format": "JPEG", "quality": jpeg_quality}}[image_format]
    written = []
    for split in splits:
        target = f"{output_dir.rstrip('/')}/{split}"
        sentences = (s for _, s in data.source.stream(split, 0, 1))  # as the source stores them: no resize or crop
        with split_folder(target) as (folder, finished):
            counts = write_split(folder, sentences, per_shard, layout, image_format, encode, finished)
            if not counts[0]:
                raise UserError(f"{target}: split {split!r} of the data has no sentences")
        say(f"{target}: {counts[0]} sentences, {counts[1]} images in {counts[2]} shards ({layout} layout)")
        written.append(target)
    return written


@contextmanager
def split_folder(target: str) -> Iterator[tuple[Path, Callable[[Path], None]]]:
    """A local folder to write a split's shards into, and what to call with each finished shard; the shards become
    `target` whole on success: the folder renamed into place (local), or each shard uploaded as it is finished and
    all of them deleted again on failure (object storage)."""
    fs, path = filesystem(target, {})
    try:
        exists = fs.exists(path) and bool(fs.ls(path))
    except Exception as err:  # noqa: BLE001 - each backend raises its own types; worded by remote_error
        raise remote_error(target, err) from None
    if exists:
        raise UserError(f"{target}: holds files already; give another --output_dir (shards are never overwritten)")
    if "://" not in target:
        with atomic_dir(target) as tmp:
            yield tmp, lambda shard: None
        return
    uploaded: list[str] = []

    def upload(shard: Path) -> None:
        try:
            fs.put_file(str(shard), f"{path}/{shard.name}")
        except Exception as err:  # noqa: BLE001 - each backend raises its own types; worded by remote_error
            raise remote_error(f"{target}/{shard.name}", err) from None
        uploaded.append(f"{path}/{shard.name}")
        shard.unlink()

    try:
        with tempfile.TemporaryDirectory() as tmp:
            yield Path(tmp), upload
    except BaseException:
        if uploaded:
            with suppress(Exception):  # the error that stopped the run is the one to report
                fs.rm(uploaded)
        raise


def write_split(
    folder: Path,
    sentences: Iterator[VisualSentence],
    per_shard: int,
    layout: str,
    image_format: str,
    encode: dict,
    finished: Callable[[Path], None],
) -> tuple[int, int, int]:
    """`sentences` as `shard-000000.tar, ...` in `folder`, `per_shard` sentences each; (sentences, images, shards)."""
    n = images = shards = 0
    groups = iter(lambda: list(islice(sentences, per_shard)), [])  # itertools.batched, before Python 3.12
    for shards, group in enumerate(groups, start=1):
        path = folder / f"shard-{shards - 1:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for sentence in group:
                for name, data in samples(f"{n:09d}", sentence, layout, image_format, encode):
                    add_member(tar, name, data)
                n, images = n + 1, images + len(sentence.images)
        finished(path)
    return n, images, shards


def samples(
    key: str, sentence: VisualSentence, layout: str, image_format: str, encode: dict
) -> Iterator[tuple[str, bytes]]:
    """The tar members of one sentence: (name, bytes), a sample's members together."""
    meta = {"kind": sentence.kind}
    if isinstance(sentence.meta.get("family"), str):
        meta["family"] = sentence.meta["family"]
    if layout == "sentence":
        for j, image in enumerate(sentence.images):
            yield f"{key}.{j}.{image_format}", image_bytes(image, encode)
        yield f"{key}.json", json.dumps(meta).encode()
        return
    for j, image in enumerate(sentence.images):
        yield f"{key}_{j:04d}.{image_format}", image_bytes(image, encode)
        yield f"{key}_{j:04d}.json", json.dumps({"sentence": key, "frame": j, **meta}).encode()


def image_bytes(image: np.ndarray, encode: dict) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, **encode)
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """A regular file member with fixed owner, mode and time, so the same sentences give the same shard bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    tar.addfile(info, io.BytesIO(data))
