"""Tokenizing's predict data: the work units this process can claim, one after another, as `UnitBatch`es."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from datamodules.sources.base import WorkUnit
from lvm_pl.batches import SentenceBatch, UnitBatch
from lvm_pl.claims import Claims


class UnitSentences(IterableDataset):
    """Walks `units` in order, claims each one it can and yields its sentences (`sentences(unit)`: dataset items) in
    batches of `batch_size`, the unit's last flagged. Batches never mix units, so a unit's batches (and thus its
    shard) are the same whoever tokenizes it. Each DataLoader worker claims its own units, for the main process."""

    def __init__(
        self,
        units: list[WorkUnit],
        claims: Claims,
        sentences: Callable[[WorkUnit], Iterable[dict]],
        batch_size: int,
        collate: Callable[[list[dict]], SentenceBatch],
        image_size: int,
    ) -> None:
        self.units, self.claims, self.sentences = units, claims, sentences
        self.batch_size, self.collate, self.image_size = batch_size, collate, image_size

    def __iter__(self) -> Iterator[UnitBatch]:
        for unit in self.units:
            if not self.claims.claim(unit.name):
                continue
            previous = None
            for items in self._chunks(unit):
                if previous is not None:
                    yield self._batch(previous, unit, last=False)
                previous = items
            yield self._batch(previous or [], unit, last=True)

    def _chunks(self, unit: WorkUnit) -> Iterator[list[dict]]:
        chunk = []
        for item in self.sentences(unit):
            chunk.append(item)
            if len(chunk) == self.batch_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def _batch(self, items: list[dict], unit: WorkUnit, last: bool) -> UnitBatch:
        if not items:  # a unit without sentences (an empty input shard) still gets its (empty) shard
            s = self.image_size
            none = torch.zeros(0, dtype=torch.long)
            empty = SentenceBatch(torch.zeros(0, 1, 3, s, s), none, none, [], [])
            return UnitBatch(**vars(empty), unit=unit.name, last=last)
        return UnitBatch(**vars(self.collate(items)), unit=unit.name, last=last)


def unit_loader(dataset: UnitSentences, num_workers: int) -> DataLoader:
    """The predict loader over `dataset` (it batches itself)."""
    return DataLoader(dataset, batch_size=None, num_workers=num_workers)
