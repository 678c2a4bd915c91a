"""A streaming source (tar shards) as an IterableDataset: each DDP rank x DataLoader worker reads its own shards,
training items mixed in a shuffle buffer, and with the source's `epoch_length` as many items on every rank."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import count, islice

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datamodules.sources.base import SentenceSource, VisualSentence
from lvm_pl.console import UserError


class SentenceStream(IterableDataset):
    """The items of one split of a streaming `source`; `items(index, sentence)` makes a sentence's items (its images,
    or itself). `shuffle_seed` None: one pass in stored order (evaluation, predict); else training: shards permuted
    and items mixed by (seed, epoch), the rank's shards repeated up to `epoch_length` items when the source sets it.
    (Tokenizing does not come through here: it reads work units, one input shard each.)"""

    def __init__(
        self,
        source: SentenceSource,
        split: str,
        items: Callable[[int, VisualSentence], list[dict]],
        rank: int = 0,
        world_size: int = 1,
        shuffle_seed: int | None = None,
    ) -> None:
        self.source, self.split, self.items = source, split, items
        self.rank, self.world_size, self.shuffle_seed = rank, world_size, shuffle_seed
        self.epoch = 0  # set by StreamLoader before each pass, so workers started for the pass see it

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        part, parts = self.rank * workers + worker, self.world_size * workers
        if self.shuffle_seed is None:
            yield from self._pass(part, parts, None)
            return
        length = self.source.epoch_length
        stream = self._passes(part, parts) if length else self._pass(part, parts, [self.shuffle_seed, self.epoch, 0])
        mixed = self._mix(stream, np.random.default_rng([self.shuffle_seed, self.epoch, part, 1]))
        # the rank's `epoch_length` items shared by its workers, so every rank takes the same number of steps
        yield from islice(mixed, length // workers + (worker < length % workers)) if length else mixed

    def _pass(self, part: int, parts: int, shuffle: list[int] | None) -> Iterator[dict]:
        for index, sentence in self.source.stream(self.split, part, parts, shuffle):
            yield from self.items(index, sentence)

    def _passes(self, part: int, parts: int) -> Iterator[dict]:
        """This part's shards over and over, each pass in a new order."""
        for n in count():
            empty = True
            for item in self._pass(part, parts, [self.shuffle_seed, self.epoch, n]):
                empty = False
                yield item
            if empty:
                raise UserError(
                    f"data.source: split {self.split!r} has no items for part {part} of {parts} (ranks x DataLoader "
                    f"workers) and epoch_length is set; give it at least {parts} shards, or fewer workers"
                )

    def _mix(self, items: Iterator[dict], rng: np.random.Generator) -> Iterator[dict]:
        """`items` through a shuffle buffer of the source's `shuffle_buffer` items (webdataset's `shuffle`)."""
        size, buffer = self.source.shuffle_buffer, []
        for item in items:
            if len(buffer) < size:
                buffer.append(item)
                continue
            j = int(rng.integers(size))
            yield buffer[j]
            buffer[j] = item
        rng.shuffle(buffer)
        yield from buffer


class StreamLoader(DataLoader):
    """A DataLoader over a training `SentenceStream` that tells it the epoch (`epoch_of()`) before each pass; its
    workers are started per pass (not persistent), so they see it."""

    def __init__(self, dataset: SentenceStream, epoch_of: Callable[[], int], **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self.epoch_of = epoch_of

    def __iter__(self):
        self.dataset.epoch = self.epoch_of()
        return super().__iter__()
