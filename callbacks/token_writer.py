"""Write the VQGAN's predictions on visual sentences into token shards (`lvm_pl/shards.py`), one per work unit.

A split is cut into work units (`WorkUnit`: a fixed range of its sentences, or one input shard). The data claims
units one at a time (`lvm_pl/claims.py`) and gives each as consecutive `UnitBatch`es; the writer closes the unit's
shard at its last batch. Any number of processes on any number of machines (and every rank of a DDP run) can share
one output directory: each takes the units nobody has done or is doing, and whichever finishes the last unit writes
the manifest. A shard depends only on its unit, so the split comes out byte-identical however the work was shared,
killed and resumed.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from tqdm import tqdm

from lvm_pl import shards
from lvm_pl.atomic import storage_errors, sweep_stale
from lvm_pl.batches import TokenizedSentences, UnitBatch
from lvm_pl.claims import CLAIM_SUFFIX, INDEX_SUFFIX, Claims
from lvm_pl.console import UserError, say
from lvm_pl.stage_data import stage_data
from lvm_pl.tokens import TokenLayout


class TokenWriter(BasePredictionWriter):
    """Prediction writer for tokenizing: the VQGAN's `TokenizedSentences` of each work unit -> one shard.

    `output_dir` holds one split (`split` names its files; it must match the data module's `predict_split`).
    `sentences_per_unit` sizes the units of sources that cut a split into index ranges; `lease_s` is how long a claim
    of a process on another host may go untouched before it counts as dead. Sentences are stored as
    `[BOS] img_1 ... img_N [EOS]` under the layout built from the model's codebook and the data's image size with
    `num_special`, `add_bos`, `add_eos`.
    """

    def __init__(
        self,
        output_dir: str,
        sentences_per_unit: int,
        lease_s: float,
        split: str = "train",
        num_special: int = 100,
        add_bos: bool = True,
        add_eos: bool = True,
    ) -> None:
        super().__init__(write_interval="batch")
        if shards.shard_split(shard_name := shards.shard_name(split, 0)) != split:
            raise UserError(f"token writer: split={split!r} must be letters, digits or '_' (got shard {shard_name})")
        if sentences_per_unit < 1 or lease_s <= 0:
            raise UserError(
                f"token writer: sentences_per_unit={sentences_per_unit} must be >= 1 and lease_s={lease_s} > 0"
            )
        self.output_dir = Path(output_dir)
        self.split, self.sentences_per_unit, self.lease_s = split, sentences_per_unit, lease_s
        self.layout_options = {"num_special": num_special, "add_bos": add_bos, "add_eos": add_eos}
        self.layout: TokenLayout | None = None
        self._units: dict = {}  # name -> WorkUnit, in the split's order
        self._claims: Claims | None = None
        self._pending: dict[str, dict[str, list]] = {}  # unit -> its sentences so far
        self._written_by: dict[Path, str | None] = {}
        self._meta: dict = {}
        self._manifest_extra: dict = {}
        self._bar: tqdm | None = None
        self._images = self._sentences = 0
        self._start = 0.0
        self.images_per_s = 0.0  # this process's images/s since predict started (the progress bar's figure)

    # ---------------------------------------------------------------- lifecycle

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        trainer.predict_loop.return_predictions = False  # a corpus's tokens must not pile up in memory: they are here
        data = stage_data(trainer)
        if data is None or data.image_size is None:
            raise UserError("token writer: tokenizing needs image data; use datamodules.VisualSentenceDataModule")
        if data.predict_split is not None and data.predict_split != self.split:
            raise UserError(
                f"token writer: split={self.split!r} but the data predicts split {data.predict_split!r};"
                " set both to the same"
            )
        units = data.work_units(self.split, self.sentences_per_unit)
        if units is None:
            raise UserError(
                f"token writer: {data.describe()} does not cut a split into work units; tokenize sentence data"
                " (datamodules.VisualSentenceDataModule)"
            )
        for unit in units:
            if shards.shard_split(unit.name) != self.split:
                raise UserError(f"token writer: work unit {unit.name!r} cannot name a shard of split {self.split!r}")
        self._units = {unit.name: unit for unit in units}
        self.layout = TokenLayout.for_images(
            int(pl_module.codebook_size), int(data.image_size), int(pl_module.downsample_factor), **self.layout_options
        )
        layout, dtype = self.layout.to_dict(), self.layout.storage_dtype.name
        self._meta = {
            "format": shards.FORMAT,
            "version": shards.VERSION,
            "split": self.split,
            "layout": layout,
            "dtype": dtype,
            "tokenizer_sha256": None,  # known once Lightning has restored the checkpoint (on_predict_start)
        }
        self._manifest_extra = {"split": self.split, "layout": layout, "dtype": dtype, "image_size": data.image_size}
        self._pending, self._written_by = {}, {}
        with storage_errors(self.output_dir):
            self.output_dir.mkdir(parents=True, exist_ok=True)
        sweep_stale(self.output_dir)  # temp files of writers on this host that were killed mid-write
        self._check_done()
        self._claims = Claims(self.output_dir, self.lease_s)
        data.predict_units(units, self._claims)
        # the unit loader batches itself, so Lightning finds no batch sampler; the batches carry their indices
        warnings.filterwarnings("ignore", message="Couldn't infer the batch indices fetched from your dataloader")

    def _check_done(self) -> None:
        """The complete shards already here must be units of this run, written with the same layout."""
        done = shards.complete_shards(self.output_dir)
        for path in done:
            if path.name[: -len(INDEX_SUFFIX)] not in self._units:
                raise UserError(
                    f"{path}: not a work unit of this run (split {self.split!r}, sentences_per_unit="
                    f"{self.sentences_per_unit}); resume with the settings that wrote it, or use a new output_dir"
                )
        for path in done:
            unit = self._units[path.name[: -len(INDEX_SUFFIX)]]
            meta = shards.read_shard_index(path).meta
            expected = {
                "unit": {"name": unit.name, "start": unit.start, "stop": unit.stop, "url": unit.url},
                "layout": self._meta["layout"],
                "dtype": self._meta["dtype"],
            }
            for key, value in expected.items():
                if meta.get(key) != value:
                    raise UserError(
                        f"{path}: was written with {key}={meta.get(key)} but this run has {value}; use a new output_dir"
                    )
            self._written_by[path] = meta.get("tokenizer_sha256")
        if self._written_by:
            say(f"token writer: {len(self._written_by)} of {len(self._units)} units of {self.output_dir} are done")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        checkpoint = trainer.ckpt_path or getattr(pl_module, "checkpoint", None)
        if checkpoint is None:
            say("token writer: no tokenizer checkpoint (--ckpt_path); the manifest records none")
        digest = shards.sha256_file(checkpoint) if checkpoint else None
        for path, written_by in self._written_by.items():
            if written_by != digest:
                raise UserError(
                    f"{path}: was written with tokenizer_sha256={written_by} but this run's tokenizer"
                    f" ({checkpoint}) has {digest}; use a new output_dir"
                )
        self._meta["tokenizer_sha256"] = digest
        self._manifest_extra["tokenizer"] = {"checkpoint": str(checkpoint) if checkpoint else None, "sha256": digest}
        self._bar = tqdm(
            total=len(self._units),
            initial=len(self._written_by),
            desc=f"tokenize {self.split}",
            unit="unit",
            dynamic_ncols=True,
            disable=not trainer.is_global_zero,
        )
        self._start = time.perf_counter()
        self._images = self._sentences = 0

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
        if not isinstance(batch, UnitBatch):
            raise UserError(
                "token writer: the data gave sentences outside a work unit; tokenize with sentence data that"
                " claims units (datamodules.VisualSentenceDataModule)"
            )
        pending = self._pending.setdefault(batch.unit, {"sentences": [], "num_images": [], "kinds": [], "indices": []})
        tokens = prediction.tokens.cpu()  # [B, N, h, w]
        counts = prediction.num_images.tolist()
        for b, index in enumerate(prediction.index.tolist()):
            sentence = self.layout.sentence(tokens[b, : counts[b]]).numpy().astype(self.layout.storage_dtype)
            for key, value in zip(pending, (sentence, counts[b], prediction.kinds[b], index), strict=True):
                pending[key].append(value)
        self._claims.touch(batch.unit)
        if batch.last:
            self._finish(batch.unit)
        self._images += int(sum(counts))
        self._sentences += len(counts)
        self.images_per_s = self._images / max(time.perf_counter() - self._start, 1e-9)
        if self._bar is not None:
            rate = f"{self._sentences} sentences here, {self.images_per_s:.1f} images/s"
            self._bar.set_postfix_str(rate, refresh=False)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # units begun but not finished (a batch limit ended predict, or workers had claimed ahead) go back
        self._claims.release_all()
        self._pending = {}
        done = self._done()
        left = [name for name in self._units if name not in done]
        if not left and not (self.output_dir / shards.MANIFEST).is_file():
            self._assemble()  # e.g. the process that finished the last unit was killed before its manifest
        elif left:
            say(
                f"token writer: {len(left)} of {len(self._units)} units of {self.output_dir} are left to other"
                f" processes (the first: {left[0]}); the one finishing the last writes the manifest, or rerun"
            )
        self._close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self._claims is not None:  # the open units go back at once: another process rewrites them whole
            self._claims.release_all()
        self._pending = {}
        self._close()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._close()

    # ---------------------------------------------------------------- internals

    def _finish(self, name: str) -> None:
        """Write unit `name`'s shard, drop its claim; the split's manifest too if it was the last."""
        unit = self._units[name]
        meta = {**self._meta, "unit": {"name": name, "start": unit.start, "stop": unit.stop, "url": unit.url}}
        shards.write_shard(self.output_dir, name, meta=meta, **self._pending.pop(name))
        self._claims.release(name)
        done = self._done()
        if self._bar is not None:
            self._bar.update(sum(n in done for n in self._units) - self._bar.n)  # also the units others finished
        if all(n in done for n in self._units):
            self._assemble()

    def _done(self) -> set[str]:
        """The units whose shards are complete, from one listing of the output directory."""
        return {f[: -len(INDEX_SUFFIX)] for f in os.listdir(self.output_dir) if f.endswith(INDEX_SUFFIX)}

    def _assemble(self) -> None:
        """The manifest, in the units' order (the same bytes whichever process writes it); the claims go."""
        manifest = shards.write_manifest(self.output_dir, list(self._units), self._manifest_extra)
        for name in self._units:
            (self.output_dir / f"{name}{CLAIM_SUFFIX}").unlink(missing_ok=True)
        c = manifest["counts"]
        say(f"tokenized {c['sentences']} sentences, {c['images']} images, {c['tokens']} tokens -> {self.output_dir}")

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
