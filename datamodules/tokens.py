"""Packed token windows from shards (`lvm_pl/shards.py`) for the autoregressive stage.

The sentences of a split's manifests, in manifest order, form one token stream. Training windows are cut `seq_len + 1`
tokens long with stride `seq_len`, so every token but the first is a label exactly once and no position is padding;
the tail (fewer than `seq_len` labels) becomes one last window padded with `labels = -100` (`tail: pad`) or is
dropped (`tail: drop`). Evaluation windows may instead start at sentence boundaries (`eval_windows: sentence`): whole
sentences are packed greedily, the rest of the window padded, and a sentence longer than a window continues in the
next one. Batches are `lvm_pl.batches.TokenBatch`es: input_ids, labels, doc_ids [B, T] (`doc_ids` number the
sentences inside each window from 0, -1 on padding, so a model can keep attention inside a sentence) and each row's
stream position, where evaluation looks its sentences up in the split's `SentenceIndex`.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from datamodules.order import OrderSampler, TrainLoader, TrainOrder
from lvm_pl import shards
from lvm_pl.batches import IGNORE_INDEX, TokenBatch
from lvm_pl.console import UserError, say
from lvm_pl.stage_data import SentenceIndex, StageData
from lvm_pl.tokens import TokenLayout

WindowMode = Literal["stream", "sentence"]


class TokenStream:
    """The sentences of some manifests back to back; `read(a, b)` returns stream tokens [a, b) as int64. The shard
    indexes give where each sentence starts (`sentence_starts` [S]) and its kind."""

    def __init__(self, manifests: list[shards.Manifest]) -> None:
        self.paths = [m.bin_path(s) for m in manifests for s in m.shards]
        self.dtypes = [m.dtype for m in manifests for _ in m.shards]
        sizes = [s["tokens"] for m in manifests for s in m.shards]
        self.bases = np.zeros(len(sizes) + 1, dtype=np.int64)  # [num_shards + 1] first stream position of each shard
        np.cumsum(sizes, out=self.bases[1:])
        starts, self.kinds = [], []
        for m in manifests:
            for s in m.shards:
                index = shards.read_shard_index(m.idx_path(s))
                offsets = index.offsets
                if offsets[-1] != s["tokens"]:
                    raise UserError(f"{m.idx_path(s)}: index covers {offsets[-1]} tokens, manifest says {s['tokens']}")
                starts.append(offsets[:-1] + self.bases[len(starts)])
                self.kinds += [index.kinds[k] for k in index.kind]
        self.sentence_starts = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)  # [S]
        self.num_tokens = int(self.bases[-1])
        self._arrays: list[np.ndarray] | None = None

    def __getstate__(self) -> dict:
        # memmaps would pickle as full copies; worker processes reopen them instead
        return {**self.__dict__, "_arrays": None}

    def read(self, start: int, stop: int) -> np.ndarray:
        if self._arrays is None:
            self._arrays = [shards.open_tokens(p, d) for p, d in zip(self.paths, self.dtypes, strict=True)]
        first = int(np.searchsorted(self.bases, start, side="right")) - 1
        out, pos = [], start
        for i in range(first, len(self._arrays)):
            if pos >= stop:
                break
            lo, hi = pos - self.bases[i], min(stop, self.bases[i + 1]) - self.bases[i]
            out.append(self._arrays[i][lo:hi])
            pos = self.bases[i] + hi
        return np.concatenate(out).astype(np.int64) if len(out) > 1 else out[0].astype(np.int64)


def stream_windows(num_tokens: int, seq_len: int, tail: Literal["pad", "drop"]) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of windows `seq_len + 1` long, stride `seq_len`; the short tail padded or dropped."""
    full = max(num_tokens - 1, 0) // seq_len
    starts = np.arange(full, dtype=np.int64) * seq_len
    lengths = np.full(full, seq_len + 1, dtype=np.int64)
    rest = num_tokens - 1 - full * seq_len
    if rest > 0 and tail == "pad":
        starts = np.append(starts, full * seq_len)
        lengths = np.append(lengths, rest + 1)
    return starts, lengths


def sentence_windows(sentence_starts: np.ndarray, num_tokens: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of windows packed greedily with whole sentences; longer sentences continue in the next."""
    ends = np.append(sentence_starts[1:], num_tokens)
    limit = seq_len + 1
    out_starts, out_lengths = [], []
    i, pos = 0, 0
    while i < len(sentence_starts):
        pos = max(pos, int(sentence_starts[i]))
        j = int(np.searchsorted(ends, pos + limit, side="right"))
        if j > i:
            out_starts.append(pos)
            out_lengths.append(int(ends[j - 1]) - pos)
            i, pos = j, int(ends[j - 1])
        else:  # sentence i does not fit from pos: a full window, the next one continues where its labels stopped
            out_starts.append(pos)
            out_lengths.append(limit)
            pos += seq_len
    return np.asarray(out_starts, dtype=np.int64), np.asarray(out_lengths, dtype=np.int64)


class PackedWindows(Dataset):
    """Map-style dataset of windows over a `TokenStream`; item i is a dict of [T] int64 tensors."""

    def __init__(self, stream: TokenStream, layout: TokenLayout, seq_len: int, starts: np.ndarray, lengths: np.ndarray):
        self.stream, self.seq_len, self.pad_id = stream, seq_len, layout.pad_id
        self.starts, self.lengths = starts, lengths

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start, length = int(self.starts[i]), int(self.lengths[i])
        window = self.stream.read(start, start + length)  # [length <= T + 1]
        n = length - 1
        marks = np.zeros(self.seq_len, dtype=np.int64)
        s = self.stream.sentence_starts
        inside = s[np.searchsorted(s, start, side="right") : np.searchsorted(s, start + n, side="left")]
        marks[inside - start] = 1
        doc_ids = np.cumsum(marks)
        if n == self.seq_len:
            input_ids, labels = window[:-1], window[1:]
        else:
            input_ids = np.full(self.seq_len, self.pad_id, dtype=np.int64)
            labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
            input_ids[:n], labels[:n] = window[:-1], window[1:]
            doc_ids[n:] = -1
        return {
            "input_ids": torch.from_numpy(np.ascontiguousarray(input_ids)),
            "labels": torch.from_numpy(np.ascontiguousarray(labels)),
            "doc_ids": torch.from_numpy(doc_ids),
            "position": start,
        }


def collate_windows(items: list[dict]) -> TokenBatch:
    """`PackedWindows` items -> a `TokenBatch`."""
    return TokenBatch(
        input_ids=torch.stack([it["input_ids"] for it in items]),
        labels=torch.stack([it["labels"] for it in items]),
        doc_ids=torch.stack([it["doc_ids"] for it in items]),
        positions=torch.tensor([it["position"] for it in items], dtype=torch.long),
    )


def _expand(paths: str | list[str] | None, key: str) -> list[Path]:
    """Shard directories or manifest files, with globs, in the order given (each glob sorted)."""
    if paths is None:
        return []
    out = []
    for p in [paths] if isinstance(paths, str) else paths:
        found = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
        if not found:
            raise UserError(f"data.{key}: {p!r} matches no shard directory")
        out += [Path(f) for f in found]
    return out


class TokenDataModule(LightningDataModule, StageData):
    """Packed windows from token shards: `train`/`val`/`test` each name shard directories, manifests or globs.

    `layout` (from the manifests) tells the model its vocabulary; `seq_len` unset (None) takes the model's context
    (`use_context`, the LVM's block_size), so a data config composes with any model size. Train windows are shuffled by
    (seed, epoch), split across ranks, and resume mid-epoch from a checkpoint. `verify: full` checks sizes, sha256 and
    id range of every shard at setup (each rank a share); `size` only sizes.
    """

    image_size = None
    predict_split = None

    def __init__(
        self,
        train: str | list[str] | None = None,
        val: str | list[str] | None = None,
        test: str | list[str] | None = None,
        seq_len: int | None = None,
        batch_size: int = 2,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        train_windows: WindowMode = "stream",
        eval_windows: WindowMode = "sentence",
        tail: Literal["pad", "drop"] = "pad",
        verify: Literal["full", "size"] = "full",
    ) -> None:
        super().__init__()
        if (seq_len is not None and seq_len < 1) or batch_size < 1:
            raise UserError(f"data: seq_len={seq_len} and batch_size={batch_size} must be >= 1")
        self.splits = {"train": _expand(train, "train"), "val": _expand(val, "val"), "test": _expand(test, "test")}
        if not any(self.splits.values()):
            raise UserError("data: give at least one of train, val, test (shard directories)")
        self.seq_len, self.batch_size, self.num_workers = seq_len, batch_size, num_workers
        self.tail, self.verify = tail, verify
        self.modes = {"train": train_windows, "val": eval_windows, "test": eval_windows}
        self.manifests = {k: [shards.load_manifest(p) for p in v] for k, v in self.splits.items()}
        self.layout = self._common_layout()
        self.streams: dict[str, TokenStream] = {}
        self.datasets: dict[str, PackedWindows] = {}
        self.order = TrainOrder(batch_size, seed, shuffle)

    def _common_layout(self) -> TokenLayout:
        all_manifests = [m for ms in self.manifests.values() for m in ms]
        first = all_manifests[0]
        for m in all_manifests[1:]:
            if m.layout != first.layout:
                raise UserError(f"{m.path}: token layout {m.layout} differs from {first.path}'s {first.layout}")
        return first.layout

    def describe(self) -> str:
        """The first manifest, to name in messages about the shards' layout."""
        return str(next(m for ms in self.manifests.values() for m in ms).path)

    def setup(self, stage: str) -> None:
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"]}.get(stage, [])
        for split in wanted:
            if split in self.streams or not self.manifests[split]:
                continue
            self._validate(split)
            self.streams[split] = TokenStream(self.manifests[split])
        if stage == "fit" and "train" not in self.streams:
            raise UserError("data.train: fitting needs train shard directories")
        self._cut_windows()

    def use_context(self, block_size: int) -> None:
        """The model's context length: without a seq_len of its own, the windows are `block_size` tokens."""
        if self.seq_len is None:
            self.seq_len = block_size
            self._cut_windows()

    def _cut_windows(self) -> None:
        if self.seq_len is None:
            return  # until the model tells its context (use_context)
        for split, stream in self.streams.items():
            if split in self.datasets:
                continue
            if self.modes[split] == "stream":
                starts, lengths = stream_windows(stream.num_tokens, self.seq_len, self.tail)
            else:
                starts, lengths = sentence_windows(stream.sentence_starts, stream.num_tokens, self.seq_len)
            self.datasets[split] = PackedWindows(stream, self.layout, self.seq_len, starts, lengths)
            say(f"{split}: {stream.num_tokens} tokens in {len(starts)} windows of {self.seq_len}")

    def sentence_index(self, split: str) -> SentenceIndex | None:
        """Where each sentence of `split`'s stream starts and its kind (after `setup` read the split)."""
        stream = self.streams.get(split)
        if stream is None:
            return None
        return SentenceIndex(stream.sentence_starts, stream.num_tokens, stream.kinds)

    def _validate(self, split: str) -> None:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        entries = [(m, s) for m in self.manifests[split] for s in m.shards]
        for i, (m, s) in enumerate(entries):
            shards.validate_shard(m, s, full=self.verify == "full" and i % world == rank)

    def _loader(self, split: str) -> DataLoader:
        train = split == "train"
        if train:
            sampler = self.order.new_sampler(len(self.datasets[split]), self.trainer)
        else:
            rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
            sampler = OrderSampler(len(self.datasets[split]), world, rank, shuffle=False, seed=0, even=False)
        return (TrainLoader if train else DataLoader)(
            self.datasets[split],
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_windows,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def _windows(self) -> dict[str, PackedWindows]:
        if self.seq_len is None:
            raise UserError("data.seq_len: not set, and no LVM gave its block_size; set data.init_args.seq_len")
        return self.datasets

    def train_dataloader(self) -> DataLoader:
        if "train" not in self._windows():
            raise UserError("data.train: no train shard directories given")
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val") if "val" in self._windows() else []  # no val shards: Lightning skips validation

    def test_dataloader(self) -> DataLoader | list:
        if "test" not in self._windows():
            raise UserError("data.test: no test shard directories given")
        return self._loader("test")

    def state_dict(self) -> dict:
        """Where training is in the window order (checkpointed by Lightning)."""
        return self.order.state_dict(self.trainer)

    def load_state_dict(self, state_dict: dict) -> None:
        self.order.load_state_dict(state_dict)
