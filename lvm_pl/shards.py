"""The token shard format: how tokenized visual sentences sit on disk (write, read, validate).

A tokenized split is one directory:

    manifest.json                   written when the split's last work unit is done, by the process that did it
    <unit>.bin                      token ids of whole sentences back to back, raw little-endian
                                    `layout.storage_dtype` (uint16 when the vocabulary fits, else int32)
    <unit>.idx.npz                  the shard's index (plain `np.savez`, no pickle):
        offsets     int64 [S + 1]   sentence s is tokens[offsets[s]:offsets[s + 1]]
        num_images  int32 [S]       images in each sentence
        index       int64 [S]       the sentence's stable index within its split (its position, for shard sources)
        kind        int32 [S]       index into `kinds`
        kinds       str   [K]       the sentence kinds seen in this shard
        meta        str   []        JSON: format, version, split, unit {name, start, stop, url}, layout, dtype,
                                    tokenizer sha256, counts, and the .bin's byte size and sha256

One shard per work unit (`datamodules.sources.base.WorkUnit`: a fixed range of the split's sentences, or one input
shard), named after it: `<split>-<number or input shard>`, e.g. `train-000012`. Each sentence is
`[BOS] img_1 ... img_N [EOS]` as `lvm_pl.tokens.TokenLayout.sentence` builds it. A shard is complete when its
`.idx.npz` exists: the `.bin` is written (atomically) first, the index (atomically) after it. The manifest
(`format`, `version`, `split`, `layout`, `dtype`, `image_size`, `tokenizer` {checkpoint, sha256}, `counts`, and per
shard `name`, `sentences`, `images`, `tokens`, `bytes`, `sha256`) is what readers open; shards are read in the order
the manifest lists them (the units' order), which fixes the token stream. Nothing in a shard or the manifest says
which process or how many wrote them: the files are the same whoever did which unit.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lvm_pl.atomic import atomic_path, write_bytes, write_json
from lvm_pl.console import UserError
from lvm_pl.tokens import TokenLayout

FORMAT = "lvm-pl-token-shards"
VERSION = 1
MANIFEST = "manifest.json"
_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_HASH_CHUNK = 1 << 24


def shard_name(split: str, number: int) -> str:
    """File stem of the shard of a split's unit `number` (a range of its sentences), e.g. `train-000012`."""
    return f"{split}-{number:06d}"


def shard_split(stem: str) -> str | None:
    """The split a shard's file stem names (`<split>-<unit>`), or None for a name that cannot be a shard's."""
    m = _NAME.match(stem)
    return m["split"] if m else None


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ShardIndex:
    """A shard's index as stored in `<name>.idx.npz` (see the module docstring)."""

    offsets: np.ndarray  # int64 [S + 1]
    num_images: np.ndarray  # int32 [S]
    index: np.ndarray  # int64 [S]
    kind: np.ndarray  # int32 [S]
    kinds: list[str]
    meta: dict

    @property
    def num_sentences(self) -> int:
        return len(self.num_images)


def write_shard(
    directory: str | Path,
    name: str,
    sentences: list[np.ndarray],
    num_images: list[int],
    kinds: list[str],
    indices: list[int],
    meta: dict,
) -> dict:
    """Write one shard (`.bin`, then `.idx.npz`, each atomically); returns its manifest entry."""
    directory = Path(directory)
    tokens = np.concatenate(sentences) if sentences else np.zeros(0, dtype=np.dtype(meta["dtype"]))
    data = tokens.astype(np.dtype(meta["dtype"]).newbyteorder("<"), copy=False).tobytes()
    entry = {
        "name": name,
        "sentences": len(sentences),
        "images": int(sum(num_images)),
        "tokens": int(tokens.size),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    write_bytes(directory / f"{name}.bin", data)
    kind_names = sorted(set(kinds))
    offsets = np.zeros(len(sentences) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in sentences], out=offsets[1:])
    with atomic_path(directory / f"{name}.idx.npz") as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            offsets=offsets,
            num_images=np.asarray(num_images, dtype=np.int32),
            index=np.asarray(indices, dtype=np.int64),
            kind=np.asarray([kind_names.index(k) for k in kinds], dtype=np.int32),
            kinds=np.asarray(kind_names, dtype=str),
            meta=np.asarray(json.dumps({**meta, **entry}, sort_keys=True)),
        )
    return entry


def read_shard_index(path: str | Path) -> ShardIndex:
    """Load `<name>.idx.npz`; a damaged file is a UserError naming it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            idx = ShardIndex(
                offsets=z["offsets"],
                num_images=z["num_images"],
                index=z["index"],
                kind=z["kind"],
                kinds=[str(k) for k in z["kinds"]],
                meta=json.loads(str(z["meta"])),
            )
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise UserError(f"{path}: unreadable shard index ({err}); delete this shard and tokenize again") from None
    if idx.meta.get("format") != FORMAT or idx.meta.get("version") != VERSION:
        raise UserError(f"{path}: not a version {VERSION} {FORMAT} index")
    return idx


def complete_shards(directory: str | Path) -> list[Path]:
    """Index files of the complete shards in `directory`, sorted by name."""
    stems = [p for p in Path(directory).glob("*.idx.npz") if shard_split(p.name[: -len(".idx.npz")])]
    return sorted(stems)


def write_manifest(directory: str | Path, names: list[str], extra: dict) -> dict:
    """Collect the shards `names` of `directory`, in that order (their units'), with `extra` keys into
    `manifest.json` (atomic); returns the manifest."""
    directory = Path(directory)
    shards, counts = [], {"shards": 0, "sentences": 0, "images": 0, "tokens": 0}
    for name in names:
        meta = read_shard_index(directory / f"{name}.idx.npz").meta
        shards.append({k: meta[k] for k in ("name", "sentences", "images", "tokens", "bytes", "sha256")})
        for key in ("sentences", "images", "tokens"):
            counts[key] += meta[key]
    counts["shards"] = len(shards)
    manifest = {"format": FORMAT, "version": VERSION, **extra, "counts": counts, "shards": shards}
    write_json(directory / MANIFEST, manifest)
    return manifest


@dataclass
class Manifest:
    """A loaded manifest: where it is, its layout and storage dtype, and its shard entries."""

    path: Path
    layout: TokenLayout
    dtype: np.dtype
    shards: list[dict]
    data: dict

    def bin_path(self, shard: dict) -> Path:
        return self.path.parent / f"{shard['name']}.bin"

    def idx_path(self, shard: dict) -> Path:
        return self.path.parent / f"{shard['name']}.idx.npz"


def load_manifest(path: str | Path) -> Manifest:
    """Open a shard directory's manifest (give the directory or the file); clear errors for a wrong or missing one."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise UserError(f"{path}: no token manifest here; tokenize first (python main.py tokenize)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable manifest ({err})") from None
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise UserError(f"{path}: not a version {VERSION} {FORMAT} manifest")
    layout = TokenLayout.from_dict(data["layout"])
    dtype = np.dtype(data["dtype"])
    if dtype != layout.storage_dtype:
        raise UserError(f"{path}: dtype {dtype} does not match the layout's storage dtype {layout.storage_dtype}")
    return Manifest(path=path, layout=layout, dtype=dtype, shards=data["shards"], data=data)


def validate_shard(manifest: Manifest, shard: dict, full: bool) -> None:
    """Check a shard against its manifest entry: size always; with `full`, sha256 and that every id is in range."""
    path = manifest.bin_path(shard)
    expected = shard["tokens"] * manifest.dtype.itemsize
    size = path.stat().st_size if path.is_file() else None
    if size is None:
        raise UserError(f"{path}: shard listed in {manifest.path} is missing")
    if size != expected or shard["bytes"] != expected:
        raise UserError(f"{path}: truncated or corrupted shard ({size} bytes, manifest says {expected}); re-tokenize")
    if not full:
        return
    h, top = hashlib.sha256(), -1
    tokens = open_tokens(path, manifest.dtype)
    step = _HASH_CHUNK // manifest.dtype.itemsize
    for start in range(0, len(tokens), step):
        chunk = np.asarray(tokens[start : start + step])
        h.update(chunk.tobytes())
        top = max(top, int(chunk.max()))
    if h.hexdigest() != shard["sha256"]:
        raise UserError(f"{path}: corrupted shard (sha256 differs from {manifest.path}); tokenize again")
    if top >= manifest.layout.vocab_size:
        raise UserError(
            f"{path}: token id {top} is out of range for the layout's vocabulary {manifest.layout.vocab_size}"
        )


def open_tokens(path: str | Path, dtype: np.dtype) -> np.ndarray:
    """Memory-map a shard's token ids ([N] of `dtype`, little-endian); empty shards give an empty array."""
    dtype = np.dtype(dtype).newbyteorder("<")
    if Path(path).stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def write_split(
    directory: str | Path,
    split: str,
    layout: TokenLayout,
    images: list[np.ndarray],
    kinds: list[str] | None = None,
    shard_tokens: int = 1 << 20,
) -> dict:
    """Write sentences of codebook ids (`images[s]`: [N_s, tokens_per_image]) as shards plus the manifest.

    The in-memory path (benchmarks, tests, imports of already-tokenized data); tokenizing images goes through
    `callbacks/token_writer.py`.
    """
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "split": split,
        "layout": layout.to_dict(),
        "dtype": layout.storage_dtype.name,
        "tokenizer_sha256": None,
    }
    kinds = kinds or ["unknown"] * len(images)
    pending: dict[str, list] = {"sentences": [], "num_images": [], "kinds": [], "indices": []}
    seq, size, names = 0, 0, []
    for s, ids in enumerate(images):
        sentence = layout.sentence(torch.as_tensor(np.asarray(ids, dtype=np.int64))).numpy()
        for key, value in zip(pending, (sentence.astype(layout.storage_dtype), len(ids), kinds[s], s), strict=True):
            pending[key].append(value)
        size += len(sentence)
        if size >= shard_tokens or s == len(images) - 1:
            names.append(shard_name(split, seq))
            write_shard(directory, names[-1], meta=meta, **pending)
            pending = {key: [] for key in pending}
            seq, size = seq + 1, 0
    extra = {"split": split, "layout": layout.to_dict(), "dtype": layout.storage_dtype.name}
    return write_manifest(directory, names, {**extra, "tokenizer": {"checkpoint": None, "sha256": None}})
