"""The batches that flow between the stages: one typed class per shape, made by the DataModules' collate functions.

    ImageBatch     images one by one                     VQGAN fit / validate / test
    SentenceBatch  whole visual sentences of images      tokenizing (VQGAN predict), LVM on images, LVM test with pixels
    UnitBatch      a SentenceBatch from one work unit    tokenizing: the token writer closes the unit's shard at `last`
    TokenBatch     packed windows of token ids           LVM fit / validate / test on token shards
    PromptBatch    prompt images (+ optional truth)      LVM predict (visual prompting)

Modules dispatch on the class (`isinstance`), never on the keys a dict happens to hold. Images are float32
[.., 3, H, W] in [-1, 1]; stacks of different lengths are zero-padded and carry their true lengths. The classes are
plain (mutable) dataclasses so Lightning moves them between devices and finds their batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100  # a label the loss skips: padding, and the positions no token follows


@dataclass
class ImageBatch:
    """Single images: `images` [B, 3, H, W], the sentence kind each came from."""

    images: torch.Tensor
    kinds: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class SentenceBatch:
    """Visual sentences: `images` [B, N, 3, H, W] zero-padded, `num_images` [B], `index` [B] (sentence number in its
    split), `kinds` per row, and `families` (the generator or source family, e.g. "moving") where the data names it."""

    images: torch.Tensor
    num_images: torch.Tensor
    index: torch.Tensor
    kinds: list[str]
    families: list[str | None] | None = None

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class UnitBatch(SentenceBatch):
    """Consecutive sentences of one tokenizing work unit (`unit`: its name); `last`: the unit's final batch."""

    unit: str = ""
    last: bool = False


@dataclass
class Sentence:
    """A whole sentence inside a token row: its first token at `start`, `num_images` images; kind and index (its
    number in the split) where the data knows them."""

    row: int
    start: int
    num_images: int
    kind: str = "unknown"
    index: int | None = None


@dataclass
class TokenBatch:
    """Packed windows: `input_ids`, `labels` (token p + 1 at label p, `IGNORE_INDEX` on padding) and `doc_ids` (the
    sentence number inside the window from 0, -1 on padding), all [B, T].

    `positions` [B]: where each row starts in its split's token stream (token shards), so evaluation can look its
    sentences up in the shard index. `sentences`: the whole sentences of the batch where the maker knows them (a
    SentenceBatch tokenized on the fly); otherwise they are found from `positions` or the layout's BOS/EOS."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    doc_ids: torch.Tensor
    positions: torch.Tensor | None = None
    sentences: list[Sentence] | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def row_tokens(self, row: int) -> torch.Tensor:
        """The window's token stream [T + 1]: its first input, then every label (token p + 1 is label p; a padded
        window's inputs hold padding where its labels hold `IGNORE_INDEX`, which no sentence reaches)."""
        return torch.cat([self.input_ids[row, :1], self.labels[row]])


@dataclass
class PromptBatch:
    """Prompts: `prompt` [B, N, 3, H, W] with `num_prompt` [B] real frames, `num_frames` [B] to generate, optional
    ground truth `truth` [B, M, 3, H, W] with `num_truth` [B] (0: none), and per row `kinds`, `names`, `index` and
    `sources` (where the prompt came from, for captions)."""

    prompt: torch.Tensor
    num_prompt: torch.Tensor
    num_frames: torch.Tensor
    truth: torch.Tensor
    num_truth: torch.Tensor
    index: torch.Tensor
    kinds: list[str]
    names: list[str]
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.prompt.shape[0]


@dataclass
class TokenizedSentences:
    """The VQGAN's predictions on a `SentenceBatch`: `tokens` [B, N, h, w] (padding images 0), `num_images`, `index`,
    `kinds` as in the batch."""

    tokens: torch.Tensor
    num_images: torch.Tensor
    index: torch.Tensor
    kinds: list[str]


@dataclass
class Generated:
    """The LVM's predictions on a `PromptBatch`: the batch, `tokens` [B, n, F, tokens_per_image] and `images`
    [B, n, F, 3, H, W] of the `n` candidates' F generated frames (F = the batch's largest `num_frames`; shorter rows
    zero-padded), with `num_tokens` generated in `seconds`."""

    prompts: PromptBatch
    tokens: torch.Tensor
    images: torch.Tensor
    num_tokens: int
    seconds: float


def pad_stacks(stacks: Sequence[torch.Tensor | None], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image stacks [n_i, 3, H, W] (None: none) -> zero-padded [B, max(1, max n_i), 3, H, W] and the counts [B]."""
    counts = [0 if s is None else len(s) for s in stacks]
    out = like.new_zeros((len(stacks), max(1, *counts), *like.shape[-3:]))
    for b, s in enumerate(stacks):
        if s is not None:
            out[b, : len(s)] = s
    return out, torch.tensor(counts, dtype=torch.long)


def batch_size(batch: ImageBatch | SentenceBatch | TokenBatch | PromptBatch) -> int:
    """Rows in a batch (for `ThroughputMonitor(batch_size_fn=...)`)."""
    return len(batch)


def batch_tokens(batch: ImageBatch | SentenceBatch | TokenBatch | PromptBatch) -> int:
    """Tokens in a token batch, one per row otherwise (for `ThroughputMonitor(length_fn=...)`: items/s are tokens/s
    when training on token shards; sentence batches are tokenized inside the step)."""
    return batch.input_ids.numel() if isinstance(batch, TokenBatch) else len(batch)
