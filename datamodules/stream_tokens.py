"""`stream-tokens`: a token shard directory's packed windows in litdata's optimized format, locally or on s3://.

Windows, not sentences, are what is stored: a window is the unit training draws, so a streamed epoch is a shuffle of
fixed-size items (no packing state to carry across chunks, ranks or a resume), and each item keeps what the doc mask
needs. An item is one flat array of the shards' dtype and fixed width (`packed_width`), read through litdata's
`TokensLoader` (a memory map of each cached chunk: litdata's per-item pytree path reads the whole chunk file per item
once it came from object storage, ~100x slower): the window's T + 1 stream tokens (padded after a short tail), then,
as raw bytes, one bit per position marking where a sentence begins (after 0: `doc_ids` = their running count), the
window's first token's place in the split's stream and its token count (int64 each). Next to litdata's `index.json`
and chunks, `sentences.npz` (every sentence's start and kind, for evaluation) and `lvm-tokens.json` (layout, window
length, item width, counts), written last: a directory without it is not read.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np

from datamodules import stream_store
from datamodules.tokens import TokenStream, sentence_windows, stream_windows
from lvm_pl import shards
from lvm_pl.atomic import atomic_dir
from lvm_pl.console import UserError, say
from lvm_pl.tokens import TokenLayout

FORMAT, VERSION = "lvm-pl-stream-tokens", 2
MARKER, SENTENCES = "lvm-tokens.json", "sentences.npz"
WINDOWS_PER_TASK = 4096  # windows one optimize task yields; tasks are what litdata spreads over its workers


def packed_width(seq_len: int, dtype: np.dtype) -> int:
    """Elements of one stored window of `dtype`: T + 1 tokens, then T start bits and two int64s as raw bytes."""
    extra = (seq_len + 7) // 8 + 16
    return seq_len + 1 + -(-extra // np.dtype(dtype).itemsize)


def pack_window(tokens: np.ndarray, starts: np.ndarray, position: int, seq_len: int, pad_id: int) -> np.ndarray:
    """The stored form of a window: `tokens` [n + 1 <= T + 1], sentence `starts` inside it, its stream `position`."""
    out = np.zeros(packed_width(seq_len, tokens.dtype), dtype=tokens.dtype)
    out[: len(tokens)], out[len(tokens) : seq_len + 1] = tokens, pad_id
    marks = np.zeros(seq_len, dtype=bool)
    marks[starts] = True
    tail = np.concatenate([np.packbits(marks), np.asarray([position, len(tokens)], dtype="<i8").view(np.uint8)])
    out[seq_len + 1 :].view(np.uint8)[: len(tail)] = tail
    return out


def window_item(stream: TokenStream, start: int, length: int, seq_len: int, pad_id: int) -> np.ndarray:
    """The stored window of `length` stream tokens from `start` (see the module docstring)."""
    s = stream.sentence_starts
    inside = s[np.searchsorted(s, start, side="right") : np.searchsorted(s, start + length - 1, side="left")]
    tokens = stream.read(start, start + length).astype(stream.dtypes[0])
    return pack_window(tokens, inside - start, start, seq_len, pad_id)


class WindowTask:
    """litdata's `fn`: task (first, last) window numbers -> their stored items (a generator: many items a task)."""

    def __init__(self, stream: TokenStream, starts: np.ndarray, lengths: np.ndarray, seq_len: int, pad_id: int) -> None:
        self.stream, self.starts, self.lengths, self.seq_len, self.pad_id = stream, starts, lengths, seq_len, pad_id

    def __call__(self, task: tuple[int, int]):
        for w in range(*task):
            yield window_item(self.stream, int(self.starts[w]), int(self.lengths[w]), self.seq_len, self.pad_id)


def stream_tokens(
    input: str,
    output: str,
    seq_len: int,
    windows: Literal["stream", "sentence"] = "stream",
    tail: Literal["pad", "drop"] = "pad",
    chunk_bytes: str = "64MB",
    workers: int = 1,
) -> str:
    """Write a token shard directory's packed windows in litdata's optimized format (for `StreamingTokenDataModule`).

    Args:
        input: token shard directory (or its manifest.json) written by tokenizing, e.g. data/tokens/train.
        output: new directory or object-store URL, e.g. s3://bucket/tokens/train (credentials and endpoint from the
            standard AWS_* environment variables); refused if it already holds anything.
        seq_len: window length T in tokens (the LVM's training context); fixed here, read back by the data module.
        windows: stream (packed back to back, no padding: training) or sentence (each window starts at a sentence:
            evaluation), as `TokenDataModule`'s train_windows / eval_windows.
        tail: the last (N - 1) mod seq_len labels of a stream: one padded window (pad) or none (drop).
        chunk_bytes: litdata chunk size, the unit downloaded and cached (e.g. 64MB).
        workers: processes writing chunks.
    """
    if seq_len < 1 or workers < 1:
        raise UserError(f"stream-tokens: seq_len={seq_len} and workers={workers} must be >= 1")
    manifest = shards.load_manifest(input)
    for s in manifest.shards:
        shards.validate_shard(manifest, s, full=False)
    _refuse_existing(output)
    stream = TokenStream([manifest])
    if windows == "stream":
        starts, lengths = stream_windows(stream.num_tokens, seq_len, tail)
    else:
        starts, lengths = sentence_windows(stream.sentence_starts, stream.num_tokens, seq_len)
    if len(starts) == 0:
        raise UserError(f"{manifest.path}: {stream.num_tokens} tokens make no window of {seq_len}")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "layout": manifest.layout.to_dict(),
        "seq_len": seq_len,
        "item_width": packed_width(seq_len, stream.dtypes[0]),
        "dtype": np.dtype(stream.dtypes[0]).name,
        "windows": windows,
        "tail": tail,
        "num_windows": len(starts),
        "num_tokens": stream.num_tokens,
        "num_sentences": len(stream.sentence_starts),
        "source": {"manifest": str(manifest.path), "tokenizer": manifest.data.get("tokenizer")},
    }
    if stream_store.is_remote(output):
        with tempfile.TemporaryDirectory(prefix="stream-tokens-") as tmp:
            _write(Path(tmp) / "out", stream, starts, lengths, meta, chunk_bytes, workers)
            _upload(Path(tmp) / "out", output)
    else:
        with atomic_dir(output) as tmp:
            _write(tmp, stream, starts, lengths, meta, chunk_bytes, workers)
    say(f"{output}: {len(starts)} windows of {seq_len} tokens ({stream.num_tokens} tokens)")
    return output


def _refuse_existing(output: str) -> None:
    fs = stream_store.filesystem(output)
    with stream_store.named_faults(output):
        taken = fs.exists(output) and (not fs.isdir(output) or bool(fs.ls(output)))
    if taken:
        raise UserError(f"{output}: already exists and is not empty; choose a new output")


def _write(directory: Path, stream: TokenStream, starts, lengths, meta: dict, chunk_bytes: str, workers: int) -> None:
    import litdata
    from litdata.streaming.item_loader import TokensLoader

    tasks = [(a, min(a + WINDOWS_PER_TASK, len(starts))) for a in range(0, len(starts), WINDOWS_PER_TASK)]
    litdata.optimize(
        fn=WindowTask(stream, starts, lengths, meta["seq_len"], TokenLayout.from_dict(meta["layout"]).pad_id),
        item_loader=TokensLoader(),
        inputs=tasks,
        output_dir=str(directory),
        chunk_bytes=chunk_bytes,
        num_workers=min(workers, len(tasks)),
        start_method="fork",  # the stream's index travels to the workers without pickling
        verbose=False,
    )
    kinds = sorted(set(stream.kinds))
    codes = np.asarray([kinds.index(k) for k in stream.kinds], dtype=np.int32)
    np.savez(directory / SENTENCES, starts=stream.sentence_starts, kind=codes, kinds=np.asarray(kinds, dtype=str))
    (directory / MARKER).write_text(json.dumps(meta, indent=1))


def _upload(local: Path, output: str) -> None:
    """Copy the written directory to `output`, the marker last; on failure remove what was copied."""
    fs = stream_store.filesystem(output)
    names = sorted(p.name for p in local.iterdir() if p.name != MARKER) + [MARKER]
    done: list[str] = []
    try:
        with stream_store.named_faults(output):
            for name in names:
                target = stream_store.join(output, name)
                fs.put_file(os.fspath(local / name), target)
                done.append(target)
    except BaseException:
        for target in done:
            with contextlib.suppress(Exception):  # the first fault is the one to report
                fs.rm_file(target)
        raise
