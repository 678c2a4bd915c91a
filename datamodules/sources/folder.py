"""Image folders: `root/<sentence>/*.png|jpg|...` is one sentence, a loose image in `root` is a single-image sentence,
or a JSONL manifest lists sentences (`{"images": [paths relative to the manifest], "kind": ..., "meta": {...}}`).

A folder is listed once into an index file (`folder_index.py`) that every rank and worker memory-maps."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
import torch.distributed as dist

from datamodules.imageio import BadImage, check_image, load_rgb
from datamodules.sources.base import SPLITS, SentenceSource, VisualSentence, partition_arrays, stable_fraction
from datamodules.sources.folder_index import FolderIndex, drop_bad, is_fresh, read_arrays, scan, write_arrays
from lvm_pl.atomic import StorageError
from lvm_pl.console import UserError, progress, say, warn
from lvm_pl.kinds import KINDS

VERIFY_CHUNK = 4096  # images decoded between two looks at the results: bounds verification's memory
INDEX_NAME = ".lvm-index/folder.npy"  # in a folder of its own: writing it leaves the root's time alone


class FolderSource(SentenceSource):
    """Sentences from image files on disk, split by a seeded hash of each sentence's name (stable as files are added).

    The listing is cached in `index_path` (default `<root>/.lvm-index/folder.npy`): rank 0 builds it, the other ranks
    wait and map it; it is rebuilt when the root or a sentence folder changed after it was written, or with `reindex`.
    Bad files (corrupt, truncated, empty, not images, over Pillow's pixel limit) are skipped with one warning counting
    them, or raise naming the path when `strict`. `verify: true` decodes every image once (JPEGs at 1/8 scale) while
    the index is built; `verify: N` decodes N images drawn at setup to report early; `false` none. Bad images found
    while loading are skipped and counted in any case.
    """

    def __init__(
        self,
        root: str,
        manifest: str | None = None,
        kind: str = "sequence",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        strict: bool = False,
        verify: bool | int = True,
        verify_threads: int = 4,
        index_path: str | None = None,
        reindex: bool = False,
    ) -> None:
        if kind not in KINDS:
            raise UserError(f"data.source.kind: {kind!r} is not one of {list(KINDS)}")
        if not (val_fraction >= 0 and test_fraction >= 0 and val_fraction + test_fraction < 1):
            raise UserError(f"data.source: val_fraction={val_fraction}, test_fraction={test_fraction} must sum to < 1")
        if verify is not True and verify is not False and verify < 0:
            raise UserError(f"data.source.verify: {verify} must be true, false or a number of images >= 0")
        self.root, self.manifest, self.kind = Path(root), manifest, kind
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.strict, self.verify, self.verify_threads = strict, verify, verify_threads
        self.index_path = Path(index_path) if index_path else self.root / INDEX_NAME
        self.reindex = reindex
        self.index: FolderIndex | None = None
        self.splits: dict[str, np.ndarray] = {}
        self.image_size = 0
        self._metas: list[dict] = []  # a manifest's per-sentence `meta`
        self._skipped_at_load = 0

    def setup(self, image_size: int, seed: int) -> None:
        self.image_size = image_size
        if self.manifest:
            self.index = self._read_manifest()
            self.splits = self._partition(self.index, seed)
        else:
            self.index, self.splits = self._shared(seed)
        if not len(self.index):
            where = self.manifest or self.root
            raise UserError(f"{where}: no sentences found (expected image files or sentence folders)")
        self._report_listing(self.index.header)
        if self.verify is not True and self.verify:
            self._verify_sample(int(self.verify), seed)
        say(
            f"folder {self.root}: {len(self.index)} sentences, "
            + ", ".join(f"{k} {len(v)}" for k, v in self.splits.items())
        )

    def _shared(self, seed: int) -> tuple[FolderIndex, dict[str, np.ndarray]]:
        """Index and splits: rank 0 makes sure fresh ones are on disk, the others then map them (or list themselves,
        when they are not reachable from their machine or could not be written)."""
        if not self.root.is_dir():
            raise UserError(f"data.source.root: {self.root} is not a folder")
        distributed = dist.is_available() and dist.is_initialized()
        first = None if distributed and dist.get_rank() != 0 else self._fresh(seed, self.reindex)
        if distributed:
            dist.barrier()
        return first or self._fresh(seed, reindex=False)  # `reindex` asks for one rebuild, rank 0's

    def _fresh(self, seed: int, reindex: bool) -> tuple[FolderIndex, dict[str, np.ndarray]]:
        index = self._fresh_index(reindex)
        return index, self._fresh_splits(index, seed)

    def _partition(self, index: FolderIndex, seed: int) -> dict[str, np.ndarray]:
        fractions = np.fromiter((stable_fraction(n, seed) for n in index.iter_names()), np.float64, len(index))
        return partition_arrays(fractions, self.val_fraction, self.test_fraction)

    def _fresh_splits(self, index: FolderIndex, seed: int) -> dict[str, np.ndarray]:
        """The splits of `index` by `seed`, cached beside it (hashing every name is the one pass left per setup)."""
        if index.file is None:
            return self._partition(index, seed)
        key = {"index_written": index.file.stat().st_ctime_ns, "seed": seed}
        key |= {"val_fraction": self.val_fraction, "test_fraction": self.test_fraction}
        path = index.file.with_name(f"splits-{seed}-{self.val_fraction}-{self.test_fraction}.npy")
        with contextlib.suppress(OSError, ValueError):
            header, arrays = read_arrays(path)
            if header == key and len(arrays) == len(SPLITS):
                return dict(zip(("test", "val", "train"), arrays, strict=True))
        splits = self._partition(index, seed)
        with contextlib.suppress(StorageError):  # the index beside it could be written: only a fault since
            write_arrays(path, key, [splits[k] for k in ("test", "val", "train")])
        return splits

    def _fresh_index(self, reindex: bool) -> FolderIndex:
        root = self.root.resolve()
        index = None if reindex else is_fresh(self.index_path, root, verified=self.verify is True)
        if index is not None:
            return index
        try:  # before listing: making the index's folder changes the root
            self.index_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            fault = StorageError(f"{self.index_path.parent}: cannot make the folder index's folder ({err.strerror})")
        else:
            fault = None
        index = scan(root, KINDS.index("single"), self._find_bad if self.verify is True else None)
        try:
            if fault is None:
                index.save(self.index_path)
        except StorageError as err:
            fault = err
        if fault is not None:
            warn(f"{fault}: the folder index stays in memory, listed by every process; set data.source.index_path")
        return index

    def _read_manifest(self) -> FolderIndex:
        path = Path(self.manifest)
        if not path.is_file():
            raise UserError(f"data.source.manifest: {path} does not exist")
        names, paths, kinds, self._metas = [], [], [], []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                images = [str(p) for p in rec["images"]]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise UserError(f"{path}:{n}: expected a JSON object with an 'images' list ({err})") from None
            kind = rec.get("kind", self.kind)
            if kind not in KINDS:
                raise UserError(f"{path}:{n}: kind {kind!r} is not one of {list(KINDS)}")
            missing = [p for p in images if not (path.parent / p).is_file()]
            if missing:
                raise UserError(f"{path}:{n}: missing image {path.parent / missing[0]}")
            names.append(rec.get("name", f"{n}:" + ",".join(images)))
            paths.append(images)
            kinds.append(KINDS.index(kind))
            self._metas.append({"path": f"{path}:{n}", **rec.get("meta", {})})
        header = {"root": str(path), "base": str(path.parent), "verified": False}
        index = FolderIndex.from_lists(header, names, paths, kinds)
        if self.verify is True:
            index = drop_bad(index, self._find_bad)
        return index

    def _find_bad(self, paths: Iterator[Path], n: int) -> tuple[np.ndarray, str | None]:
        """Decode `n` images from a thread pool (PIL releases the GIL), with a progress bar: which are bad, and the
        first one's error."""
        bad, first, done = np.zeros(n, bool), None, 0
        with ThreadPoolExecutor(self.verify_threads) as pool:
            # a chunk at a time: `map` submits everything it is given at once, a future per image
            chunks = iter(lambda: list(islice(paths, VERIFY_CHUNK)), [])
            for chunk in progress(chunks, f"verifying {n} images ({VERIFY_CHUNK} a step)", -(-n // VERIFY_CHUNK)):
                errors = list(pool.map(self._error_of, chunk))
                bad[done : done + len(chunk)] = [e is not None for e in errors]
                first = first or next((e for e in errors if e is not None), None)
                done += len(chunk)
        return bad, first

    def _verify_sample(self, count: int, seed: int) -> None:
        """Decode `count` images drawn by `seed` (the same ones in every rank), to find a bad corpus early."""
        total = len(self.index.path_offsets) - 1
        drawn = np.sort(np.random.default_rng(seed).choice(total, min(count, total), replace=False))
        bad, first_error = self._find_bad((self.index.path(int(i)) for i in drawn), len(drawn))
        if bad.any() and self.strict:
            raise UserError(f"bad image (strict: true): {first_error}")
        if bad.any():
            warn(
                f"{self.root}: {int(bad.sum())} of {len(drawn)} sampled images unreadable ({bad.mean():.1%}), "
                f"e.g. {first_error}; unreadable images are skipped and counted as they are loaded"
            )

    @staticmethod
    def _error_of(path: Path) -> str | None:
        try:
            check_image(path)
        except BadImage as err:
            return str(err)
        return None

    def _report_listing(self, header: dict) -> None:
        """The files the index left out, counted (every setup, also when the index is reused)."""
        skipped = header.get("not_images", {})
        if skipped.get("count"):
            self._report(skipped["count"], skipped["example"], "not image files")
        unreadable = header.get("unreadable", {})
        if unreadable.get("count") and self.strict:
            raise UserError(f"bad image (strict: true): {unreadable['error']}")
        if unreadable.get("count"):
            what = "unreadable images (corrupt, truncated, empty or over Pillow's pixel limit)"
            self._report(unreadable["count"], unreadable["error"].split(": ")[0], what)

    def _report(self, count: int, example: str, what: str) -> None:
        if self.strict:
            raise UserError(f"{example}: {what} (strict: true); remove it or set strict: false")
        warn(f"{self.root}: skipped {count} {what}, e.g. {example}")

    def _skip(self, err: BadImage) -> None:
        """A bad image met while loading: raise when `strict`, else count it (warned at 1, 2, 4, 8, ...)."""
        if self.strict:
            raise UserError(f"bad image: {err}") from None
        self._skipped_at_load += 1
        if self._skipped_at_load & (self._skipped_at_load - 1) == 0:
            warn(f"{self.root}: skipped {self._skipped_at_load} unreadable images while loading, e.g. {err}")

    def split_size(self, split: str) -> int:
        return len(self.splits.get(split, []))

    def num_images(self, split: str, index: int) -> int:
        s = self.splits[split][index]
        return int(self.index.image_starts[s + 1] - self.index.image_starts[s])

    def image_counts(self, split: str) -> np.ndarray:
        return self.index.counts()[self.splits[split]]

    def _meta(self, s: int) -> dict:
        if self.manifest:
            return self._metas[s]
        return {"path": str(self.root / self.index.name(s))}

    def sentence(self, split: str, index: int) -> VisualSentence:
        """Sentence `index` without its unreadable images (counted); one with none readable gives the next one's."""
        for step in range(self.split_size(split)):
            s = int(self.splits[split][(index + step) % self.split_size(split)])
            images, files = [], []
            for path in self.index.sentence_paths(s):
                try:
                    images.append(load_rgb(path, min_side=self.image_size))
                    files.append(str(path))
                except BadImage as err:
                    self._skip(err)
            if images:
                return VisualSentence(images, self.index.kind(s, self.kind), {**self._meta(s), "files": files})
        raise UserError(f"{self.root}: no readable image in split {split!r}")

    def image(self, split: str, index: int, position: int) -> tuple[np.ndarray, str]:
        """Image `position` of sentence `index`; an unreadable one (counted) gives the next readable image of the
        split, so a batch keeps its size."""
        size, starts = self.split_size(split), self.index.image_starts
        for step in range(size + 1):  # + 1: back round to the images before `position`
            s = int(self.splits[split][(index + step) % size])
            for p in range(position if step == 0 else 0, int(starts[s + 1] - starts[s])):
                try:
                    return load_rgb(self.index.path(int(starts[s]) + p), self.image_size), self.index.kind(s, self.kind)
                except BadImage as err:
                    self._skip(err)
        raise UserError(f"{self.root}: no readable image in split {split!r}")

    def describe(self, split: str, index: int) -> str:
        return self._meta(int(self.splits[split][index]))["path"]
