"""Write the VQGAN's predictions on visual sentences into token shards (`lvm_pl/shards.py`), resumably.

Each rank appends the sentences it receives, in order, to its own shards and closes a shard once it holds at least
`shard_tokens` tokens. Shard boundaries thus depend only on the rank's sentence stream, so a run restarted into the
same directory skips the sentences of its complete shards and rewrites exactly the shards an uninterrupted run writes.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from lvm_pl import shards
from lvm_pl.atomic import pid_alive, storage_errors
from lvm_pl.batches import TokenizedSentences
from lvm_pl.console import UserError, say, warn
from lvm_pl.stage_data import stage_data
from lvm_pl.tokens import TokenLayout


class RunLock:
    """A lock file holding host and pid; a lock left by a dead process on this host is taken over with a warning."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held = False

    def acquire(self) -> None:
        with storage_errors(self.path):  # a read-only or full output_dir is named here, before any work
            self._acquire()

    def _acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if owner.get("host") == me["host"] and not pid_alive(owner.get("pid", -1)):
                    warn(f"{self.path}: taking over the lock of dead process {owner.get('pid')}")
                    self.path.unlink(missing_ok=True)
                    continue
                raise UserError(
                    f"{self.path}: another tokenize run (host {owner.get('host')}, pid {owner.get('pid')}) is writing"
                    " into this directory; wait for it, or delete the lock file if that run is gone"
                ) from None
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
            except OSError:
                self.path.unlink(missing_ok=True)  # a full disk must not leave a lock that blocks the next run
                raise
            self.held = True
            return
        raise UserError(f"{self.path}: could not take the lock; delete the file if no tokenize run is active")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # half-written by a process that died between create and write


class TokenWriter(BasePredictionWriter):
    """Prediction writer for tokenizing: the VQGAN's `TokenizedSentences` -> shards.

    `output_dir` holds one split (`split` names its files; it must match the data module's `predict_split` when that
    exists). Sentences are stored as `[BOS] img_1 ... img_N [EOS]` under the layout built from the model's codebook and
    the data's image size with `num_special`, `add_bos`, `add_eos`. On resume, sentences already in complete shards
    are skipped here, and the data module is told them at setup (`StageData.skip_predict`) so it need not load or
    encode them at all (it keeps each rank's remaining sentences in their original order).
    """

    def __init__(
        self,
        output_dir: str,
        split: str = "train",
        shard_tokens: int = 1 << 20,
        num_special: int = 100,
        add_bos: bool = True,
        add_eos: bool = True,
    ) -> None:
        super().__init__(write_interval="batch")
        if shards.parse_shard_name(shard_name := shards.shard_name(split, 0, 0)) is None:
            raise UserError(f"token writer: split={split!r} must be letters, digits or '_' (got shard {shard_name})")
        if shard_tokens < 1:
            raise UserError(f"token writer: shard_tokens={shard_tokens} must be >= 1")
        self.output_dir = Path(output_dir)
        self.split = split
        self.shard_tokens = shard_tokens
        self.layout_options = {"num_special": num_special, "add_bos": add_bos, "add_eos": add_eos}
        self.layout: TokenLayout | None = None
        self._lock: RunLock | None = None
        self._done: set[int] = set()
        self._seq = 0
        self._pending: dict[str, list] = {"sentences": [], "num_images": [], "kinds": [], "indices": []}
        self._pending_tokens = 0
        self._meta: dict = {}
        self._manifest_extra: dict = {}
        self._written_by: dict[Path, str | None] = {}
        self._images = 0
        self._start = 0.0
        self.images_per_s = 0.0  # this rank's images/s since predict started (the progress bar's figure)

    # ---------------------------------------------------------------- lifecycle

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        data = stage_data(trainer)
        if data is None or data.image_size is None:
            raise UserError("token writer: tokenizing needs image data; use datamodules.VisualSentenceDataModule")
        if data.predict_split is not None and data.predict_split != self.split:
            raise UserError(
                f"token writer: split={self.split!r} but the data predicts split {data.predict_split!r};"
                " set both to the same"
            )
        image_size = data.image_size
        self.layout = TokenLayout.for_images(
            int(pl_module.codebook_size), int(image_size), int(pl_module.downsample_factor), **self.layout_options
        )
        self._meta = {
            "format": shards.FORMAT,
            "version": shards.VERSION,
            "split": self.split,
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "layout": self.layout.to_dict(),
            "dtype": self.layout.storage_dtype.name,
            "tokenizer_sha256": None,  # known once Lightning has restored the checkpoint (on_predict_start)
        }
        self._manifest_extra = {
            "split": self.split,
            "layout": self.layout.to_dict(),
            "dtype": self.layout.storage_dtype.name,
            "image_size": int(image_size),
            "world_size": trainer.world_size,
        }
        self._done, self._seq, self._written_by = set(), 0, {}
        self._pending = {key: [] for key in self._pending}
        self._pending_tokens = 0
        self._lock = RunLock(self.output_dir / f".lock-{self.split}-r{trainer.global_rank:05d}")
        self._lock.acquire()
        self._resume(trainer)
        if self._done:
            data.skip_predict(self._done)  # the data need not even load them

    def _resume(self, trainer: Trainer) -> None:
        """Collect the sentences of this rank's complete shards; remove what an interrupted run left half-written."""
        rank = trainer.global_rank
        for path in shards.complete_shards(self.output_dir):
            split, other_rank, _ = shards.parse_shard_name(path.name[: -len(".idx.npz")])
            if split != self.split:
                raise UserError(f"{path}: {self.output_dir} holds split {split!r}; give each split its own output_dir")
            if other_rank >= trainer.world_size:
                raise UserError(
                    f"{path}: written by rank {other_rank} but this run has {trainer.world_size} ranks; resume with the"
                    " same number of devices, or use a new output_dir"
                )
        mine = [p for p in shards.complete_shards(self.output_dir) if f"-r{rank:05d}-" in p.name]
        for seq, path in enumerate(mine):
            idx = shards.read_shard_index(path)
            if not path.name.startswith(shards.shard_name(self.split, rank, seq)):
                raise UserError(f"{path}: shard sequence has a gap before it; use a new output_dir")
            self._written_by[path] = idx.meta.get("tokenizer_sha256")
            for key in ("world_size", "layout", "dtype"):
                if idx.meta.get(key) != self._meta[key]:
                    raise UserError(
                        f"{path}: was written with {key}={idx.meta.get(key)} but this run has {self._meta[key]};"
                        " use a new output_dir"
                    )
            self._done.update(idx.index.tolist())
        self._seq = len(mine)
        stem = shards.shard_name(self.split, rank, self._seq)
        for leftover in [*self.output_dir.glob(f"{stem}.bin"), *self.output_dir.glob(f".{self.split}-r{rank:05d}-*")]:
            leftover.unlink(missing_ok=True)
        if self._seq:
            say(f"token writer: rank {rank} resumes after {self._seq} shards ({len(self._done)} sentences)")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        checkpoint = trainer.ckpt_path or getattr(pl_module, "checkpoint", None)
        if checkpoint is None:
            warn("token writer: no tokenizer checkpoint (--ckpt_path); the manifest records none")
        digest = shards.sha256_file(checkpoint) if trainer.is_global_zero and checkpoint else None
        digest = trainer.strategy.broadcast(digest, src=0)
        for path, written_by in self._written_by.items():
            if written_by != digest:
                raise UserError(
                    f"{path}: was written with tokenizer_sha256={written_by} but this run's tokenizer"
                    f" ({checkpoint}) has {digest}; use a new output_dir"
                )
        self._meta["tokenizer_sha256"] = digest
        self._manifest_extra["tokenizer"] = {"checkpoint": str(checkpoint) if checkpoint else None, "sha256": digest}
        self._start = time.perf_counter()
        self._images = 0

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: TokenizedSentences,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        tokens = prediction.tokens.cpu()  # [B, N, h, w]
        counts = prediction.num_images.tolist()
        for b, index in enumerate(prediction.index.tolist()):
            if index in self._done:
                continue
            sentence = self.layout.sentence(tokens[b, : counts[b]]).numpy().astype(self.layout.storage_dtype)
            self._add(sentence, counts[b], prediction.kinds[b], index)
        self._images += int(sum(counts))
        self._show_speed(trainer)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pending["sentences"]:
            self._flush()
        trainer.strategy.barrier("token_writer")
        if trainer.is_global_zero:
            manifest = shards.write_manifest(self.output_dir, self._manifest_extra)
            c = manifest["counts"]
            counts = f"{c['sentences']} sentences, {c['images']} images, {c['tokens']} tokens"
            say(f"tokenized {counts} -> {self.output_dir}")
        self._release()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._release()  # the open shard is dropped on purpose: a resumed run rewrites it whole

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._release()

    # ---------------------------------------------------------------- internals

    def _add(self, sentence: np.ndarray, num_images: int, kind: str, index: int) -> None:
        for key, value in zip(self._pending, (sentence, num_images, kind, index), strict=True):
            self._pending[key].append(value)
        self._done.add(index)
        self._pending_tokens += len(sentence)
        if self._pending_tokens >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        name = shards.shard_name(self.split, self._meta["rank"], self._seq)
        shards.write_shard(self.output_dir, name, meta=self._meta, **self._pending)
        self._seq += 1
        self._pending = {key: [] for key in self._pending}
        self._pending_tokens = 0

    def _show_speed(self, trainer: Trainer) -> None:
        self.images_per_s = self._images / max(time.perf_counter() - self._start, 1e-9)
        bar = getattr(trainer.progress_bar_callback, "predict_progress_bar", None)
        if bar is not None:
            bar.set_postfix({"images/s": f"{self.images_per_s:.1f}"}, refresh=False)

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
