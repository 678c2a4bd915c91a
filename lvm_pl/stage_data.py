"""What a stage may ask of its DataModule: the one declared contract between modules, callbacks and data.

The DataModules subclass `StageData` explicitly and set what they know; modules and callbacks reach the data only
through `stage_data(trainer)`, never through undeclared attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from lvm_pl.batches import Sentence
from lvm_pl.tokens import TokenLayout

if TYPE_CHECKING:
    from datamodules.sources.base import WorkUnit
    from lvm_pl.claims import Claims


@dataclass(frozen=True)
class SentenceIndex:
    """The sentences of one split's token stream: where each starts (`starts` [S], ascending; sentence s ends where
    s + 1 starts, the last at `num_tokens`) and its kind."""

    starts: np.ndarray
    num_tokens: int
    kinds: list[str]

    def whole_sentences(self, row: int, position: int, length: int, layout: TokenLayout) -> list[Sentence]:
        """The sentences lying wholly inside the `length` tokens from stream `position` (a window's inputs and its
        last label), with their kinds and numbers."""
        first = int(np.searchsorted(self.starts, position, side="left"))
        out = []
        for s in range(first, len(self.starts)):
            start = int(self.starts[s])
            end = int(self.starts[s + 1]) if s + 1 < len(self.starts) else self.num_tokens
            if end > position + length:
                break
            out.append(Sentence(row, start - position, layout.num_images(end - start), self.kinds[s], s))
        return out


@runtime_checkable
class StageData(Protocol):
    """Declared by every DataModule of lvm-pl; `None` where the data does not know."""

    layout: TokenLayout | None  # token data: the shards' token layout
    image_size: int | None  # image data: the side length images reach the model at
    seq_len: int | None  # token data: the window length
    predict_split: str | None  # sentence data: the split `predict` runs over (tokenizing)

    def sentence_index(self, split: str) -> SentenceIndex | None:
        """Where the sentences of `split`'s token stream start and their kinds (token data), else None."""
        return None

    def describe(self) -> str:
        """The data in a few words, for messages (e.g. the first manifest of token shards)."""
        return type(self).__name__

    def use_context(self, block_size: int) -> None:
        """The model's context length, told at the model's setup: token data without its own `seq_len` cuts windows
        that long (so a data config composes with any model size); other data ignores it."""

    def work_units(self, split: str, sentences_per_unit: int) -> list[WorkUnit] | None:
        """The work units tokenizing `split` is cut into (sentence data), else None."""
        return None

    def predict_units(self, units: list[WorkUnit], claims: Claims) -> None:
        """Make `predict` yield the `units` this process can take through `claims`, as `UnitBatch`es (tokenizing)."""


def stage_data(trainer) -> StageData | None:
    """The trainer's DataModule as `StageData`, or None (no trainer, no DataModule, or a foreign one)."""
    datamodule = trainer.datamodule if trainer is not None else None
    return datamodule if isinstance(datamodule, StageData) else None
