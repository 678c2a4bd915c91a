"""The source interface: a source lists the sentences of each split and produces sentence `i` of a split on demand."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from lvm_pl.shards import shard_name

SPLITS = ("train", "val", "test")


@dataclass
class VisualSentence:
    """An ordered list of same-size uint8 RGB images ([H, W, 3] each) plus a kind tag and its ground truth.

    `kind` only groups evaluation results (the model never sees it); `meta` carries ground truth and provenance.
    """

    images: list[np.ndarray]
    kind: str
    meta: dict = field(default_factory=dict)


Indexed = tuple[int, VisualSentence]  # a sentence and its stable index in its split


@dataclass(frozen=True)
class WorkUnit:
    """A piece of a split that one process tokenizes into one output shard, independent of how many processes run.

    Either a fixed range `[start, stop)` of the split's sentence index (map-style sources) or one input shard
    (`url`, for sources stored as shards). `name` is stable across runs and machines: it names the output shard.
    """

    split: str
    name: str
    start: int = 0
    stop: int = 0
    url: str | None = None


class SentenceSource(ABC):
    """Where sentences come from. `setup` is called once per process before any other method.

    Indexed sources answer `split_size`/`sentence` for any index. A `streaming` source (tar shards) has no index: it
    is only read through `stream`, each DDP rank x DataLoader worker its own part, and sets `shuffle_buffer` (training
    items mixed across sentences and shards) and `epoch_length` (training items per rank, None: one pass).
    """

    streaming = False
    shuffle_buffer = 1
    epoch_length: int | None = None

    @abstractmethod
    def setup(self, image_size: int, seed: int) -> None:
        """List (or prepare) the sentences of every split; raise `UserError` on bad input."""

    @abstractmethod
    def split_size(self, split: str) -> int:
        """Number of sentences in `split`."""

    @abstractmethod
    def num_images(self, split: str, index: int) -> int:
        """Number of images of sentence `index` of `split`, without loading it."""

    @abstractmethod
    def sentence(self, split: str, index: int) -> VisualSentence:
        """Sentence `index` of `split`; images may be any size (the DataModule resizes and crops them)."""

    def image_counts(self, split: str) -> np.ndarray:
        """`num_images` of every sentence of `split`, int64 [n]; sources with an index answer without a loop."""
        return np.array([self.num_images(split, i) for i in range(self.split_size(split))], np.int64)

    def image(self, split: str, index: int, position: int) -> tuple[np.ndarray, str]:
        """Image `position` of sentence `index` and the sentence's kind; sources that can make one image alone
        (without the rest of its sentence) override this."""
        s = self.sentence(split, index)
        return s.images[position], s.kind

    def describe(self, split: str, index: int) -> str:
        """Where sentence `index` comes from, for error messages (a path for file sources)."""
        return f"{type(self).__name__} {split}[{index}]"

    def has_sentences(self, split: str) -> bool:
        """Whether `split` has any sentence (streaming sources: any shard), without reading them."""
        return self.split_size(split) > 0

    def stream(self, split: str, part: int, parts: int, shuffle: list[int] | None = None) -> Iterator[Indexed]:
        """The sentences of part `part` of `parts` with their indices: here every `parts`-th index, in index order or
        permuted by the seed `shuffle`."""
        mine = np.arange(part, self.split_size(split), parts)
        for i in mine if shuffle is None else np.random.default_rng(shuffle).permutation(mine):
            yield int(i), self.sentence(split, int(i))

    def work_units(self, split: str, sentences_per_unit: int) -> list[WorkUnit]:
        """The units tokenizing splits `split` into: fixed index ranges here; shard sources give one per shard."""
        return range_units(split, self.split_size(split), sentences_per_unit)

    def unit_sentences(self, unit: WorkUnit) -> Iterator[tuple[int, VisualSentence]]:
        """The sentences of `unit` in order, each with its index in the split (its position for shard sources)."""
        for i in range(unit.start, unit.stop):
            yield i, self.sentence(unit.split, i)


def range_units(split: str, size: int, sentences_per_unit: int) -> list[WorkUnit]:
    """A split of `size` sentences as consecutive index ranges of `sentences_per_unit` (the last may be shorter)."""
    step = max(1, sentences_per_unit)
    return [WorkUnit(split, shard_name(split, s // step), s, min(s + step, size)) for s in range(0, size, step)]


def stable_fraction(name: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (name, seed), independent of listing order and Python's hash salt."""
    digest = hashlib.sha1(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def partition(names: list[str], seed: int, val_fraction: float, test_fraction: float) -> dict[str, list[int]]:
    """Disjoint train/val/test index lists over `names`, assigned by a seeded hash of each name.

    Sorting by hash (rather than thresholding it) gives exact split sizes; a non-zero fraction of three or more
    names gets at least one sentence so a small folder still validates.
    """
    order = sorted(range(len(names)), key=lambda i: (stable_fraction(names[i], seed), names[i]))
    return {split: sorted(indices) for split, indices in cut(order, val_fraction, test_fraction).items()}


def partition_arrays(fractions: np.ndarray, val_fraction: float, test_fraction: float) -> dict[str, np.ndarray]:
    """`partition` over `stable_fraction`s already computed (float64 [n]), as sorted int64 index arrays: no Python
    object per sentence. Equal fractions (a 53-bit tie) are ordered by index instead of by name."""
    order = np.argsort(fractions, kind="stable")
    return {split: np.sort(indices) for split, indices in cut(order, val_fraction, test_fraction).items()}


def cut(order, val_fraction: float, test_fraction: float) -> dict:
    """Test, val and train as consecutive pieces of `order` (a list or array of indices by hash)."""
    n = len(order)

    def count(fraction: float) -> int:
        k = round(fraction * n)
        return max(k, 1) if fraction > 0 and n >= 3 else k

    n_test, n_val = count(test_fraction), count(val_fraction)
    return {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
