"""Packed token windows streamed from object storage (or a local directory) written by `main.py stream-tokens`.

litdata's `StreamingDataset` reads each source: chunks downloaded on first use into `cache_dir` and evicted past
`max_cache_size`. The training order is our `MixPlan` (datamodules/mix_plan.py), not litdata's
`CombinedStreamingDataset` + `StreamingDataLoader`: at litdata 0.2.76 a weighted combination draws sources at random
per worker and resumes only on the world size, worker count and batch size it was saved with. The plan draws each
source without replacement by weight, the same on any number of ranks, so a resumed epoch continues exactly. Items
become the same `TokenBatch` rows as local shards give, doc ids included, decoded a batch at a time (`__getitems__`).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from datamodules import stream_store
from datamodules.mix_plan import MixOrder
from datamodules.order import OrderSampler, TrainLoader
from datamodules.stream_tokens import FORMAT, MARKER, SENTENCES, VERSION
from lvm_pl.batches import IGNORE_INDEX, TokenBatch
from lvm_pl.console import UserError, say
from lvm_pl.stage_data import SentenceIndex, StageData
from lvm_pl.tokens import TokenLayout


def window_batch(items: list[np.ndarray], seq_len: int, pad_id: int) -> TokenBatch:
    """Stored windows (`pack_window`, one [width] array each) -> their `TokenBatch`, decoded together: the rows
    `PackedWindows` gives for the same windows (padding after a short tail)."""
    stored = np.stack(items)  # [B, width]
    tail = np.ascontiguousarray(stored[:, seq_len + 1 :]).view(np.uint8)  # [B, bytes]: start marks, position, length
    nbits = (seq_len + 7) // 8
    marks = np.unpackbits(tail[:, :nbits], axis=1, count=seq_len)  # [B, T]
    info = np.ascontiguousarray(tail[:, nbits : nbits + 16]).view("<i8")  # [B, 2]
    input_ids = stored[:, :seq_len].astype(np.int64)  # [B, T]
    labels = stored[:, 1 : seq_len + 1].astype(np.int64)
    doc_ids = np.cumsum(marks, axis=1, dtype=np.int64)
    if (info[:, 1] <= seq_len).any():  # a short tail: padding past the window's n = length - 1 labels
        pad = np.arange(seq_len)[None, :] >= info[:, 1:2] - 1
        input_ids[pad], labels[pad], doc_ids[pad] = pad_id, IGNORE_INDEX, -1
    return TokenBatch(
        input_ids=torch.from_numpy(input_ids),
        labels=torch.from_numpy(labels),
        doc_ids=torch.from_numpy(doc_ids),
        positions=torch.from_numpy(info[:, 0].copy()),
    )


def first(items: list[TokenBatch]) -> TokenBatch:
    """The DataLoader's collate for `StreamedWindows`: its `__getitems__` returns the batch already made."""
    return items[0]


class StreamedSource:
    """One `stream-tokens` output: its metadata and chunk sizes, read at setup; items through litdata, lazily."""

    def __init__(self, url: str) -> None:
        self.url = url
        meta = stream_store.read_json(stream_store.join(url, MARKER))
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise UserError(f"{stream_store.join(url, MARKER)}: not a version {VERSION} {FORMAT} file")
        self.meta = meta
        self.layout = TokenLayout.from_dict(meta["layout"])
        self.seq_len, self.item_width = int(meta["seq_len"]), int(meta["item_width"])
        index = stream_store.read_json(stream_store.join(url, "index.json"))
        self.chunk_sizes = [int(c["chunk_size"]) for c in index["chunks"]]
        self.chunk_files = [str(c["filename"]) for c in index["chunks"]]
        if sum(self.chunk_sizes) != meta["num_windows"]:
            raise UserError(f"{url}: index.json holds {sum(self.chunk_sizes)} windows, {MARKER} {meta['num_windows']}")

    def sentence_index(self) -> SentenceIndex:
        raw = stream_store.read_bytes(stream_store.join(self.url, SENTENCES))
        with np.load(io.BytesIO(raw)) as f:
            kinds = [str(k) for k in f["kinds"]]
            return SentenceIndex(f["starts"], int(self.meta["num_tokens"]), [kinds[k] for k in f["kind"]])


class StreamedWindows(Dataset):
    """Windows of several `StreamedSource`s: item (source, i) (or i: source 0) is a dict of [T] tensors.

    A DataLoader reads a batch at a time (`__getitems__`): per run of keys in one chunk, the first window through
    litdata (which downloads and caches the chunk and keeps its own count of what was read), the others sliced at
    once from a memory map of that cached chunk file, where litdata's `TokensLoader` would read them one by one.
    """

    KEEP_MAPS = 4  # chunk memory maps kept open (a plan visits one chunk per source at a time)

    def __init__(self, sources: list[StreamedSource], pad_id: int, cache_dir: str, max_cache_size: str) -> None:
        self.urls, self.seq_len, self.pad_id = [s.url for s in sources], sources[0].seq_len, pad_id
        self.cache_dir, self.max_cache_size = cache_dir, max_cache_size
        self.chunk_starts = [np.cumsum([0, *s.chunk_sizes]) for s in sources]  # [source][chunk + 1]
        self.chunk_files = [s.chunk_files for s in sources]
        # opened here, so workers share the index.json downloaded once
        self.datasets = [self._open(s.url, s.item_width) for s in sources]
        self._primed = False
        self._maps: dict[tuple[int, int], np.ndarray | None] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_primed": False, "_maps": {}}  # litdata readers reopen in each worker

    def _open(self, url: str, width: int):
        from litdata import StreamingDataset
        from litdata.streaming.item_loader import TokensLoader

        stream_store.allow_plain_http()
        kwargs = {}
        if stream_store.is_remote(url):  # one cache folder per source: litdata names chunks alike in every one
            key = hashlib.sha256(url.encode()).hexdigest()[:16]
            kwargs = {"cache_dir": os.path.join(self.cache_dir, key), "max_cache_size": self.max_cache_size}
        with stream_store.named_faults(url):
            return StreamingDataset(url, item_loader=TokensLoader(block_size=width), **kwargs)

    def _read(self, key: tuple[int, int] | int) -> np.ndarray:
        if not self._primed:
            for url, dataset in zip(self.urls, self.datasets, strict=True):
                with stream_store.named_faults(url):
                    dataset[:1]  # a slice read makes litdata fetch whole chunks from then on, not each item's bytes
            self._primed = True
        source, i = key if isinstance(key, tuple) else (0, key)
        with stream_store.named_faults(self.urls[source]):
            return self.datasets[source][int(i)]

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, torch.Tensor]:
        """One window as the [T] tensors `PackedWindows` yields."""
        batch = window_batch([self._read(key)], self.seq_len, self.pad_id)
        return {
            "input_ids": batch.input_ids[0],
            "labels": batch.labels[0],
            "doc_ids": batch.doc_ids[0],
            "position": int(batch.positions[0]),
        }

    def __getitems__(self, keys: list) -> list[TokenBatch]:
        """A DataLoader's batch read: the windows decoded together into one `TokenBatch` (collate with `first`)."""
        pairs = [k if isinstance(k, tuple) else (0, k) for k in keys]
        source = np.asarray([s for s, _ in pairs], dtype=np.int64)
        item = np.asarray([i for _, i in pairs], dtype=np.int64)
        chunk = np.asarray([np.searchsorted(self.chunk_starts[s], i, side="right") - 1 for s, i in pairs])
        rows: list[np.ndarray | None] = [None] * len(pairs)
        bounds = np.flatnonzero((np.diff(source) != 0) | (np.diff(chunk) != 0)) + 1
        for run in np.split(np.arange(len(pairs)), bounds):  # runs of keys in one chunk, in the plan's order
            s, c, first_key = int(source[run[0]]), int(chunk[run[0]]), pairs[run[0]]
            rows[run[0]] = head = self._read(first_key)  # through litdata: the chunk is fetched and counted
            mapped = self._chunk_map(s, c, head.dtype, head.shape[0])
            if mapped is None:  # not a file here (litdata laid its cache out otherwise): one by one through it
                for r in run[1:]:
                    rows[r] = self._read(pairs[r])
                continue
            local = item[run[1:]] - self.chunk_starts[s][c]
            for r, window in zip(run[1:], mapped[local], strict=True):
                rows[r] = window
        return [window_batch(rows, self.seq_len, self.pad_id)]

    def _chunk_map(self, source: int, chunk: int, dtype: np.dtype, width: int) -> np.ndarray | None:
        """[chunk_size, width] memory map of chunk `chunk` of `source` as litdata wrote it (a uint32 item count and
        chunk_size + 1 offsets, then the fixed-width items), from the folder litdata reads it from; None if absent."""
        key = (source, chunk)
        if key not in self._maps:
            folder = self.datasets[source].input_dir.path  # the source itself, or litdata's cache folder of it
            path = os.path.join(folder or "", self.chunk_files[source][chunk])
            size = int(self.chunk_starts[source][chunk + 1] - self.chunk_starts[source][chunk])
            offset = (1 + size + 1) * 4
            fits = os.path.isfile(path) and os.path.getsize(path) >= offset + size * width * dtype.itemsize
            self._maps[key] = np.memmap(path, dtype, "r", offset, (size, width)) if fits else None
            while len(self._maps) > self.KEEP_MAPS:
                self._maps.pop(next(iter(self._maps)))
        return self._maps[key]


def _sources(value: str | dict[str, float] | None, key: str) -> dict[str, float]:
    if value is None:
        return {}
    out = {value: 1.0} if isinstance(value, str) else dict(value)
    if not out:
        raise UserError(f"data.{key}: give a stream-tokens output URL or {{url: weight}}")
    return out


class StreamingTokenDataModule(LightningDataModule, StageData):
    """Token windows from `stream-tokens` outputs (local or s3://): `train` is one URL or `{url: weight}` (drawn by
    weight without replacement; the source that runs out first ends the epoch), `val`/`test` one URL each.

    The window length and layout come from the data (all sources must agree; `seq_len`, when given, must match).
    Training resumes mid-epoch from a checkpoint onto any number of ranks.
    """

    image_size = None
    predict_split = None

    def __init__(
        self,
        train: str | dict[str, float] | None = None,
        val: str | None = None,
        test: str | None = None,
        seq_len: int | None = None,
        batch_size: int = 2,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        mix_block: int = 1000,
        cache_dir: str = "cache/stream",
        max_cache_size: str = "50GB",
    ) -> None:
        super().__init__()
        if batch_size < 1 or mix_block < 1:
            raise UserError(f"data: batch_size={batch_size} and mix_block={mix_block} must be >= 1")
        self.weights = {"train": _sources(train, "train"), "val": _sources(val, "val"), "test": _sources(test, "test")}
        if not any(self.weights.values()):
            raise UserError("data: give at least one of train, val, test (stream-tokens outputs)")
        self.batch_size, self.num_workers, self.seed, self.shuffle = batch_size, num_workers, seed, shuffle
        self.mix_block, self.cache_dir, self.max_cache_size = mix_block, str(Path(cache_dir)), max_cache_size
        self.sources = {k: [StreamedSource(u) for u in v] for k, v in self.weights.items()}
        every = [s for ss in self.sources.values() for s in ss]
        for s in every[1:]:
            if s.layout != every[0].layout or s.seq_len != every[0].seq_len:
                raise UserError(
                    f"{s.url}: layout/seq_len {s.layout}/{s.seq_len} differ from {every[0].url}'s"
                    f" {every[0].layout}/{every[0].seq_len}"
                )
        self.layout, self.seq_len = every[0].layout, every[0].seq_len
        if seq_len is not None and seq_len != self.seq_len:
            raise UserError(f"data.seq_len: {seq_len}, but {every[0].url} holds windows of {self.seq_len}")
        chunks, weights = [s.chunk_sizes for s in self.sources["train"]], list(self.weights["train"].values())
        self.order = MixOrder(chunks, weights, batch_size, seed, shuffle, mix_block) if chunks else None
        self.datasets: dict[str, StreamedWindows] = {}
        self._indexes: dict[str, SentenceIndex] = {}

    def describe(self) -> str:
        return next(s.url for ss in self.sources.values() for s in ss)

    def setup(self, stage: str) -> None:
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"]}.get(stage, [])
        for split in wanted:
            if split in self.datasets or not self.sources[split]:
                continue
            sources = self.sources[split]
            self.datasets[split] = StreamedWindows(sources, self.layout.pad_id, self.cache_dir, self.max_cache_size)
            windows = sum(s.meta["num_windows"] for s in sources)
            say(f"{split}: {windows} windows of {self.seq_len} from {len(sources)} source(s)")
        if stage == "fit" and "train" not in self.datasets:
            raise UserError("data.train: fitting needs train stream-tokens outputs")

    def sentence_index(self, split: str) -> SentenceIndex | None:
        """Evaluation splits (one source each): where each sentence starts and its kind."""
        if split not in self.datasets or len(self.sources[split]) != 1:
            return None
        if split not in self._indexes:
            self._indexes[split] = self.sources[split][0].sentence_index()
        return self._indexes[split]

    def _eval_loader(self, split: str) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        size = self.sources[split][0].meta["num_windows"]
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            sampler=OrderSampler(size, world, rank, shuffle=False, seed=0, even=False),
            num_workers=self.num_workers,
            collate_fn=first,
        )

    def train_dataloader(self) -> DataLoader:
        if "train" not in self.datasets:
            raise UserError("data.train: no train stream-tokens outputs given")
        return TrainLoader(
            self.datasets["train"],
            batch_size=self.batch_size,
            sampler=self.order.new_sampler(self.trainer),
            num_workers=self.num_workers,
            collate_fn=first,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("val") if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.datasets:
            raise UserError("data.test: no test stream-tokens outputs given")
        return self._eval_loader("test")

    def state_dict(self) -> dict:
        """Where the whole run is in this epoch's plan (checkpointed by Lightning; resumable on any world size)."""
        return self.order.state_dict(self.trainer) if self.order else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.order:
            self.order.load_state_dict(state_dict)
