"""The folder index: an image tree listed once into one file of numpy arrays that every process memory-maps.

Paths are one UTF-8 bytes blob plus offsets (no Python object per image), so a process holds a few pages of it, not
the corpus. The file is a sequence of `.npy` arrays (numpy's own format, read with `np.lib.format`), written
atomically. It is fresh while the root and every sentence folder keep the modification times they had when listed
(adding, removing or renaming an entry changes its folder's), for the same root and at least the verification asked.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np

from datamodules.imageio import IMAGE_EXTENSIONS
from lvm_pl.atomic import atomic_path
from lvm_pl.console import progress
from lvm_pl.kinds import KINDS

VERSION = 1
# which of n images (given lazily) are bad, bool [n], and the first one's error
Check = Callable[[Iterator[Path], int], tuple[np.ndarray, str | None]]
FIELDS = ("names", "name_offsets", "paths", "path_offsets", "image_starts", "kinds", "mtimes")
NAMES_CHUNK = 1 << 20  # names decoded at a time while hashing them: bounds the memory of a pass
SOURCE_KIND = 255  # a sentence folder: the kind the source is configured with, not fixed in the index


def natural_key(path: str | os.PathLike) -> list:
    """Sort key on a file's name that puts frame2 before frame10."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", os.path.basename(path))]


def pack(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (uint8 blob of their UTF-8 bytes, int64 offsets [n + 1])."""
    encoded = [s.encode() for s in strings]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), np.uint8), offsets


@dataclass
class FolderIndex:
    """Sentences of a folder (or manifest): sentence `s` is named `name(s)` and holds images `image_starts[s]` to
    `image_starts[s + 1]` of the path list, paths relative to `header["base"]`; `kinds[s]` indexes `header["kinds"]`
    (`SOURCE_KIND`: the source's configured kind); `mtimes[s]` is its folder's modification time when listed (0: a
    loose image). `header` also records the root's and what was skipped while listing."""

    header: dict
    names: np.ndarray
    name_offsets: np.ndarray
    paths: np.ndarray
    path_offsets: np.ndarray
    image_starts: np.ndarray
    kinds: np.ndarray
    mtimes: np.ndarray
    file: Path | None = field(default=None, compare=False)

    @classmethod
    def from_lists(
        cls, header: dict, names: list[str], paths: list[list[str]], kinds: list[int], mtimes: list[int] | None = None
    ) -> FolderIndex:
        """An in-memory index of `names[s]` holding images `paths[s]` (relative to `header["base"]`)."""
        starts = np.zeros(len(paths) + 1, np.int64)
        np.cumsum([len(p) for p in paths], out=starts[1:])
        names_blob, name_offsets = pack(names)
        paths_blob, path_offsets = pack([p for group in paths for p in group])
        kinds_array = np.asarray(kinds, np.uint8)
        mtimes_array = np.asarray(mtimes if mtimes is not None else [0] * len(names), np.int64)
        return cls({**header, "version": VERSION, "kinds": list(KINDS)}, names_blob, name_offsets, paths_blob,
                   path_offsets, starts, kinds_array, mtimes_array)  # fmt: skip

    def __len__(self) -> int:
        return len(self.image_starts) - 1

    def counts(self) -> np.ndarray:
        """Images per sentence, int64 [n]."""
        return np.diff(self.image_starts)

    def name(self, s: int) -> str:
        return bytes(self.names[self.name_offsets[s] : self.name_offsets[s + 1]]).decode()

    def path(self, image: int) -> Path:
        """Image number `image` (over all sentences) as a path."""
        a, b = self.path_offsets[image], self.path_offsets[image + 1]
        return Path(self.header["base"]) / bytes(self.paths[a:b]).decode()

    def sentence_paths(self, s: int) -> list[Path]:
        return [self.path(i) for i in range(self.image_starts[s], self.image_starts[s + 1])]

    def kind(self, s: int, default: str) -> str:
        code = int(self.kinds[s])
        return default if code == SOURCE_KIND else self.header["kinds"][code]

    def without(self, bad: np.ndarray) -> FolderIndex:
        """This index with the images where `bad` (bool [images]) is set left out (their sentences kept)."""
        keep = ~bad
        lengths = np.diff(self.path_offsets)[keep]
        path_offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=path_offsets[1:])
        byte_keep = np.repeat(keep, np.diff(self.path_offsets))
        kept_before = np.concatenate([[0], np.cumsum(keep)])
        return FolderIndex(self.header, self.names, self.name_offsets, self.paths[byte_keep], path_offsets,
                           kept_before[self.image_starts], self.kinds, self.mtimes)  # fmt: skip

    def save(self, path: Path) -> None:
        """Write atomically to `path`."""
        write_arrays(path, self.header, [getattr(self, name) for name in FIELDS])
        self.file = path

    @classmethod
    def load(cls, path: Path) -> FolderIndex:
        """Map the index at `path` (raises OSError/ValueError when it is not one)."""
        header, arrays = read_arrays(path)
        if len(arrays) != len(FIELDS):
            raise ValueError(f"{path}: {len(arrays)} arrays, not a folder index")
        return cls(header, *arrays, file=path)

    def iter_names(self) -> Iterator[str]:
        """Every sentence name in order, decoded a chunk at a time (never a list of them all)."""
        for a in range(0, len(self), NAMES_CHUNK):
            offsets = self.name_offsets[a : min(a + NAMES_CHUNK, len(self)) + 1].tolist()
            blob = self.names[offsets[0] : offsets[-1]].tobytes()
            yield from (blob[x - offsets[0] : y - offsets[0]].decode() for x, y in pairwise(offsets))

    def __reduce__(self):
        # a DataLoader worker started by spawn maps the file again rather than receiving a copy of it
        if self.file is not None:
            return FolderIndex.load, (self.file,)
        return super().__reduce__()


def write_arrays(path: Path, header: dict, arrays: list[np.ndarray]) -> None:
    """Write `header` (JSON) and `arrays` to `path` atomically, as consecutive `.npy` records."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for array in [np.frombuffer(json.dumps(header).encode(), np.uint8), *arrays]:
            np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


def read_arrays(path: Path) -> tuple[dict, list[np.ndarray]]:
    """`write_arrays`'s header and arrays, the arrays memory-mapped read-only (as plain ndarray views)."""
    arrays = []
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        while f.tell() < end:
            major, _minor = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            offset, size = f.tell(), int(np.prod(shape)) * dtype.itemsize
            mapped = np.memmap(path, dtype, "r", offset, shape).view(np.ndarray) if size else np.zeros(shape, dtype)
            arrays.append(mapped)  # a view: indexing a np.memmap subclass costs microseconds a call
            f.seek(offset + size)
    if not arrays:
        raise ValueError(f"{path}: empty")
    return json.loads(arrays[0].tobytes().decode()), arrays[1:]


def is_fresh(path: Path, root: Path, verified: bool) -> FolderIndex | None:
    """The index at `path` when it is one for `root`, at least as verified as asked, and the tree is as listed."""
    try:
        index = FolderIndex.load(path)
        written = path.stat().st_ctime_ns
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    header = index.header
    if header.get("version") != VERSION or header.get("root") != str(root) or (verified and not header["verified"]):
        return None
    mtime = root.stat().st_mtime_ns
    # an index written straight into the root set the root's time to its own (both from one rename)
    if mtime != header["root_mtime_ns"] and not (path.parent.resolve() == root and mtime == written):
        return None
    folders = np.flatnonzero(index.kinds == SOURCE_KIND)  # a loose image's changes show on the root
    try:
        now = np.fromiter(((root / index.name(s)).stat().st_mtime_ns for s in folders), np.int64, len(folders))
    except FileNotFoundError:
        return None
    return index if np.array_equal(now, index.mtimes[folders]) else None


def scan(root: Path, kind_single: int, check: Check | None) -> FolderIndex:
    """List `root`: each folder is a sentence of its images (natural order), each loose image a one-image sentence.
    `check`, when given, finds the bad images among those listed; they are left out and counted."""
    names, paths, kinds, mtimes, skipped = [], [], [], [], []
    root_mtime = root.stat().st_mtime_ns
    with os.scandir(root) as entries:
        for entry in sorted(progress(entries, f"listing {root}"), key=natural_key):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                with os.scandir(entry.path) as inner:
                    files = sorted(
                        (e.name for e in inner if e.is_file() and not e.name.startswith(".")), key=natural_key
                    )
                images = [n for n in files if n.lower().endswith(IMAGE_EXTENSIONS)]
                skipped += [f"{entry.name}/{n}" for n in files if not n.lower().endswith(IMAGE_EXTENSIONS)]
                names.append(entry.name)
                paths.append([f"{entry.name}/{n}" for n in images])
                kinds.append(SOURCE_KIND)
                mtimes.append(entry.stat().st_mtime_ns)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                names.append(entry.name)
                paths.append([entry.name])
                kinds.append(kind_single)
                mtimes.append(0)
            else:
                skipped.append(entry.name)
    header = {"root": str(root), "base": str(root), "verified": check is not None, "root_mtime_ns": root_mtime}
    header["not_images"] = {"count": len(skipped), "example": str(root / skipped[0]) if skipped else None}
    index = FolderIndex.from_lists(header, names, paths, kinds, mtimes)
    return drop_bad(index, check) if check is not None else index


def drop_bad(index: FolderIndex, check: Check) -> FolderIndex:
    """`index` without the images `check` finds bad; their count and the first one's error go into the header."""
    n = len(index.path_offsets) - 1
    bad, first_error = check((index.path(i) for i in range(n)), n)
    index = index.without(bad) if bad.any() else index
    index.header = {**index.header, "verified": True, "unreadable": {"count": int(bad.sum()), "error": first_error}}
    return index
