"""`VisualSentenceDataModule`: one DataModule for both stages, single images (VQGAN) or whole sentences (tokenizing,
evaluation, on-the-fly LVM training), from any `SentenceSource`. Images reach modules as float32 in [-1, 1]."""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.imageio import fit_image
from datamodules.sources.base import SPLITS, SentenceSource, VisualSentence
from datamodules.tokens import WindowSampler, _TrainLoader
from lvm_pl.console import UserError, warn
from lvm_pl.images import to_tensor

__all__ = ["SentenceDataset", "VisualSentence", "VisualSentenceDataModule", "collate_sentences"]


class SentenceDataset(Dataset):
    """Map-style view of one split: item `k` is image `k` of the split's flattened images (`unit="image"`) or
    sentence `k` (`unit="sentence"`). Map-style, so Lightning gives each DDP rank a disjoint DistributedSampler."""

    def __init__(self, dm: VisualSentenceDataModule, split: str, unit: str) -> None:
        self.dm, self.split, self.unit = dm, split, unit
        self.size = dm.source.split_size(split)
        if unit == "image":
            lengths = [dm.clip_length(dm.source.num_images(split, i)) for i in range(self.size)]
            self.starts = np.concatenate([[0], np.cumsum(lengths)]).tolist()

    def __len__(self) -> int:
        return self.starts[-1] if self.unit == "image" else self.size

    def __getitem__(self, k: int) -> dict:
        if self.unit == "image":
            i = bisect.bisect_right(self.starts, k) - 1
            image, kind = self.dm.image(self.split, i, k - self.starts[i])
            return {"image": to_tensor(image), "kind": kind}  # [3, H, W]
        s = self.dm.sentence(self.split, k)
        return {"images": torch.stack([to_tensor(x) for x in s.images]), "kind": s.kind, "index": k}  # [N, 3, H, W]


def collate_sentences(items: list[dict]) -> dict:
    """Sentences of different lengths -> {"images": [B, N, 3, H, W] zero-padded, "num_images", "kind", "index"}."""
    n = max(it["images"].shape[0] for it in items)
    first = items[0]["images"]
    images = first.new_zeros((len(items), n, *first.shape[1:]))
    for b, it in enumerate(items):
        images[b, : it["images"].shape[0]] = it["images"]
    return {
        "images": images,
        "num_images": torch.tensor([it["images"].shape[0] for it in items], dtype=torch.long),
        "kind": [it["kind"] for it in items],
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
    }


class _PredictSampler(DistributedSampler):
    """This rank's sentences as Lightning shards predict data (rank::world, in order), minus `skip`."""

    def __init__(self, size: int, num_replicas: int, rank: int, skip: set[int]) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.indices = [i for i in range(rank, size, num_replicas) if i not in skip]
        self.num_samples = len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


class VisualSentenceDataModule(LightningDataModule):
    """Visual sentences from `source`, resized (shorter side to `image_size`, then a centre or random crop).

    `unit="image"` yields {"image": [B, 3, H, W], "kind"}; `unit="sentence"` yields `collate_sentences` batches.
    Sentences longer than `max_images` are cut; one shorter than `min_images` fails at setup naming its path.
    `crop="random"` crops training sentences at a position drawn per sentence from the seed (val/test: centre).
    Training order is a permutation by (seed, epoch), split across ranks; a checkpoint carries the position in it, so a
    resumed `fit` sees exactly the batches the interrupted one had not trained on.
    """

    def __init__(
        self,
        source: SentenceSource,
        image_size: int = 64,
        unit: Literal["image", "sentence"] = "image",
        crop: Literal["center", "random"] = "center",
        min_images: int = 1,
        max_images: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        predict_split: Literal["train", "val", "test"] = "train",
    ) -> None:
        super().__init__()
        if image_size < 1 or batch_size < 1 or num_workers < 0 or min_images < 1:
            raise UserError(
                f"data: image_size={image_size}, batch_size={batch_size}, min_images={min_images} must be >= 1 "
                f"and num_workers={num_workers} >= 0"
            )
        if max_images is not None and max_images < min_images:
            raise UserError(f"data.max_images={max_images} is below data.min_images={min_images}")
        self.source, self.image_size, self.unit, self.crop = source, image_size, unit, crop
        self.min_images, self.max_images = min_images, max_images
        self.batch_size, self.num_workers, self.seed, self.predict_split = batch_size, num_workers, seed, predict_split
        self._ready = False
        self._train_sampler: WindowSampler | None = None
        self._resume_state: dict | None = None
        self.predict_skip: set[int] = set()  # sentences a resumed tokenize run already wrote (set by TokenWriter)

    def setup(self, stage: str | None = None) -> None:
        """Prepare the source once and check every sentence is long enough."""
        if self._ready:
            return
        self.source.setup(self.image_size, self.seed)
        for split in SPLITS:
            for i in range(self.source.split_size(split)):
                n = self.source.num_images(split, i)
                if n < self.min_images:
                    raise UserError(
                        f"{self.source.describe(split, i)}: {n} images, fewer than data.min_images={self.min_images}"
                    )
        self._ready = True

    def clip_length(self, n: int) -> int:
        """Images kept from a sentence of `n` (after `max_images`)."""
        return n if self.max_images is None else min(n, self.max_images)

    def split_size(self, split: str) -> int:
        """Number of sentences in `split`."""
        self.setup()
        return self.source.split_size(split)

    def _crop(self, split: str, index: int) -> tuple[float, float]:
        # one crop position per sentence, so its images stay aligned (analogies, sequences)
        if self.crop == "random" and split == "train":
            return tuple(np.random.default_rng([self.seed, SPLITS.index(split), index, 1]).random(2))
        return (0.5, 0.5)

    def sentence(self, split: str, index: int) -> VisualSentence:
        """Sentence `index` of `split` as the modules see it (resized, cropped, cut), uint8 images and full `meta`."""
        self.setup()
        s = self.source.sentence(split, index)
        crop = self._crop(split, index)
        images = [fit_image(x, self.image_size, crop) for x in s.images[: self.clip_length(len(s.images))]]
        return VisualSentence(images, s.kind, s.meta)

    def image(self, split: str, index: int, position: int) -> tuple[np.ndarray, str]:
        """Image `position` of sentence `index` of `split` (resized and cropped like `sentence` does) and its kind."""
        self.setup()
        image, kind = self.source.image(split, index, position)
        return fit_image(image, self.image_size, self._crop(split, index)), kind

    def sentences(self, split: str) -> Iterator[VisualSentence]:
        """Every sentence of `split` in index order (e.g. held-out sentences with ground truth for prompting)."""
        for i in range(self.split_size(split)):
            yield self.sentence(split, i)

    def dataset(self, split: str) -> SentenceDataset:
        """The map-style dataset of `split` for this DataModule's `unit`."""
        self.setup()
        return SentenceDataset(self, split, self.unit)

    def _loader(self, dataset: SentenceDataset, sampler: WindowSampler | None = None) -> DataLoader:
        return (DataLoader if sampler is None else _TrainLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_sentences if self.unit == "sentence" else None,
            persistent_workers=self.num_workers > 0,
            # its own generator: creating an iterator (every epoch, and once more on resume) then draws nothing
            # from the global RNG, which training (quantizer restarts) uses and checkpoints
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        dataset = self.dataset("train")
        sampler = WindowSampler(len(dataset), world, rank, shuffle=True, seed=self.seed)
        if self._resume_state is not None:
            self._resume(sampler, self._resume_state)
            self._resume_state = None
        self._train_sampler = sampler
        return self._loader(dataset, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"))

    def predict_dataloader(self) -> DataLoader:
        if not self.predict_skip:
            return self._loader(self.dataset(self.predict_split))
        # a resumed tokenize run: the TokenWriter has set the sentences its complete shards already hold
        ds = self.dataset(self.predict_split)
        sampler = _PredictSampler(len(ds), self.trainer.world_size, self.trainer.global_rank, self.predict_skip)
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_sentences if self.unit == "sentence" else None,
        )

    def state_dict(self) -> dict:
        """Where training is in its order: epoch and items this rank consumed (checkpointed by Lightning)."""
        if self.trainer is None or self._train_sampler is None:
            return {}
        # the loop's count, not the loader's: Lightning prefetches a batch the model has not trained on yet
        batches = self.trainer.fit_loop.epoch_loop.batch_progress.current.ready
        return {
            "epoch": self.trainer.current_epoch,
            "consumed": batches * self.batch_size,
            **self._order(self._train_sampler),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if self._train_sampler is None:
            self._resume_state = dict(state_dict)  # usual case: restored before the train loader is built
        elif self._train_sampler.started:
            warn("data: the train loader was iterated before the checkpoint was restored; the epoch restarts")
        else:
            self._resume(self._train_sampler, state_dict)

    @staticmethod
    def _order(sampler: WindowSampler) -> dict:
        return {"num_items": len(sampler.dataset), "world_size": sampler.num_replicas, "seed": sampler.seed}

    def _resume(self, sampler: WindowSampler, state: dict) -> None:
        now, then = self._order(sampler), {k: state.get(k) for k in self._order(sampler)}
        if then != now:
            warn(f"data: checkpoint's training order was {then}, now {now}; the epoch restarts from its first item")
            sampler.resume(state["epoch"], 0)
        else:
            sampler.resume(state["epoch"], state["consumed"])
