"""`VisualSentenceDataModule`: one DataModule for both stages, single images (VQGAN) or whole sentences (tokenizing,
evaluation, on-the-fly LVM training), from any `SentenceSource`: `ImageBatch`es or `SentenceBatch`es
(`lvm_pl.batches`), images as float32 in [-1, 1]. Indexed sources are read map-style; streaming ones (tar shards)
through `SentenceStream`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from datamodules.imageio import fit_image
from datamodules.order import TrainLoader, TrainOrder
from datamodules.sentence_stream import SentenceStream, StreamLoader
from datamodules.sources.base import SPLITS, SentenceSource, VisualSentence, WorkUnit
from datamodules.units import UnitSentences, unit_loader
from lvm_pl.batches import ImageBatch, SentenceBatch, pad_stacks
from lvm_pl.claims import Claims
from lvm_pl.console import UserError
from lvm_pl.images import to_tensor
from lvm_pl.stage_data import StageData

__all__ = ["SentenceDataset", "VisualSentence", "VisualSentenceDataModule", "collate_images", "collate_sentences"]


class SentenceDataset(Dataset):
    """Map-style view of one split: item `k` is image `k` of the split's flattened images (`lengths` gives each
    sentence's image count) or, with `lengths` None, sentence `k`. `read_image(i, position)` and `read_sentence(i)`
    return what the modules see (resized, cropped). Map-style, so each DDP rank gets a disjoint DistributedSampler."""

    def __init__(
        self,
        size: int,
        read_sentence: Callable[[int], VisualSentence],
        read_image: Callable[[int, int], tuple[np.ndarray, str]],
        lengths: np.ndarray | None = None,
    ) -> None:
        self.size, self.read_sentence, self.read_image = size, read_sentence, read_image
        # int64 [n + 1], not a list: 8 bytes a sentence in every worker
        self.starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]) if lengths is not None else None

    def __len__(self) -> int:
        return int(self.starts[-1]) if self.starts is not None else self.size

    def __getitem__(self, k: int) -> dict:
        if self.starts is not None:
            i = int(np.searchsorted(self.starts, k, side="right")) - 1
            return image_item(*self.read_image(i, k - int(self.starts[i])))
        return sentence_item(self.read_sentence(k), k)


def image_item(image: np.ndarray, kind: str) -> dict:
    """One image as `collate_images` takes it."""
    return {"image": to_tensor(image), "kind": kind}  # [3, H, W]


def sentence_item(s: VisualSentence, index: int) -> dict:
    """One sentence as `collate_sentences` takes it."""
    images = torch.stack([to_tensor(x) for x in s.images])  # [N, 3, H, W]
    return {"images": images, "kind": s.kind, "index": index, "family": s.meta.get("family")}


def collate_images(items: list[dict]) -> ImageBatch:
    """Single images -> an `ImageBatch`."""
    return ImageBatch(torch.stack([it["image"] for it in items]), [it["kind"] for it in items])


def collate_sentences(items: list[dict]) -> SentenceBatch:
    """Sentences of different lengths -> a `SentenceBatch` (images zero-padded to the longest)."""
    images, counts = pad_stacks([it["images"] for it in items], items[0]["images"])
    return SentenceBatch(
        images=images,
        num_images=counts,
        index=torch.tensor([it["index"] for it in items], dtype=torch.long),
        kinds=[it["kind"] for it in items],
        families=[it.get("family") for it in items],
    )


class VisualSentenceDataModule(LightningDataModule, StageData):
    """Visual sentences from `source`, resized (shorter side to `image_size`, then a centre or random crop).

    `unit="image"` yields `ImageBatch`es, `unit="sentence"` `SentenceBatch`es.
    Sentences longer than `max_images` are cut; one shorter than `min_images` fails at setup naming its path (a
    streaming source's, when it is read).
    `crop="random"` crops training sentences at a position drawn per sentence from the seed (val/test: centre).
    Training order is a permutation by (seed, epoch), split across ranks; a checkpoint carries the position in it, so a
    resumed `fit` sees exactly the batches the interrupted one had not trained on (a streaming source's epoch starts
    over: its order is by shard, see `SentenceStream`).
    """

    layout = None
    seq_len = None

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
        self.order = TrainOrder(batch_size, seed)
        self._units: tuple[list[WorkUnit], Claims] | None = None  # set by the token writer: predict claims units

    def work_units(self, split: str, sentences_per_unit: int) -> list[WorkUnit]:
        """The work units tokenizing `split` is cut into (the source's: index ranges, or one per input shard)."""
        self.setup()
        return self.source.work_units(split, sentences_per_unit)

    def predict_units(self, units: list[WorkUnit], claims: Claims) -> None:
        """Make `predict` yield the `units` this process can take through `claims` (tokenizing)."""
        self._units = (units, claims)

    def setup(self, stage: str | None = None) -> None:
        """Prepare the source once and check every sentence is long enough."""
        if self._ready:
            return
        self.source.setup(self.image_size, self.seed)
        for split in SPLITS if not self.source.streaming else ():
            counts = self.source.image_counts(split)
            short = np.flatnonzero(counts < self.min_images)
            if len(short):
                i = int(short[0])
                where, n = self.source.describe(split, i), counts[i]
                raise UserError(f"{where}: {n} images, fewer than data.min_images={self.min_images}")
        self._ready = True

    def clip_length(self, n: int) -> int:
        """Images kept from a sentence of `n` (after `max_images`)."""
        return n if self.max_images is None else min(n, self.max_images)

    def split_size(self, split: str) -> int:
        """Number of sentences in `split`."""
        self.setup()
        return self.source.split_size(split)

    def has_split(self, split: str) -> bool:
        """Whether `split` has sentences (a streaming source: shards), without reading them."""
        self.setup()
        return self.source.has_sentences(split)

    def _crop(self, split: str, index: int) -> tuple[float, float]:
        # one crop position per sentence, so its images stay aligned (analogies, sequences)
        if self.crop == "random" and split == "train":
            return tuple(np.random.default_rng([self.seed, SPLITS.index(split), index, 1]).random(2))
        return (0.5, 0.5)

    def sentence(self, split: str, index: int) -> VisualSentence:
        """Sentence `index` of `split` as the modules see it (resized, cropped, cut), uint8 images and full `meta`."""
        self.setup()
        return self._fit(split, index, self.source.sentence(split, index))

    def _fit(self, split: str, index: int, s: VisualSentence) -> VisualSentence:
        crop = self._crop(split, index)
        images = [fit_image(x, self.image_size, crop) for x in s.images[: self.clip_length(len(s.images))]]
        return VisualSentence(images, s.kind, s.meta)

    def unit_items(self, unit: WorkUnit) -> Iterator[dict]:
        """The sentences of a work unit in order, as the modules see them (resized, cropped, cut) and collate takes
        them."""
        self.setup()
        for index, s in self.source.unit_sentences(unit):
            yield sentence_item(self._fit(unit.split, index, s), index)

    def image(self, split: str, index: int, position: int) -> tuple[np.ndarray, str]:
        """Image `position` of sentence `index` of `split` (resized and cropped like `sentence` does) and its kind."""
        self.setup()
        image, kind = self.source.image(split, index, position)
        return fit_image(image, self.image_size, self._crop(split, index)), kind

    def sentences(self, split: str) -> Iterator[VisualSentence]:
        """Every sentence of `split` in index order, or stored order for a streaming source (e.g. held-out sentences
        with ground truth for prompting)."""
        self.setup()
        for index, s in self.source.stream(split, 0, 1):
            yield self._fit(split, index, self._long_enough(split, index, s))

    def _long_enough(self, split: str, index: int, s: VisualSentence) -> VisualSentence:
        if len(s.images) < self.min_images:
            where = self.source.describe(split, index)
            raise UserError(f"{where}: {len(s.images)} images, fewer than data.min_images={self.min_images}")
        return s

    def _stream_items(self, split: str, index: int, s: VisualSentence) -> list[dict]:
        s = self._fit(split, index, self._long_enough(split, index, s))
        return [image_item(x, s.kind) for x in s.images] if self.unit == "image" else [sentence_item(s, index)]

    def stream(self, split: str, shuffle: bool = False) -> SentenceStream:
        """The iterable dataset of a streaming source's `split`: this rank's part, for this DataModule's `unit`."""
        self.setup()
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        items = partial(self._stream_items, split)
        return SentenceStream(self.source, split, items, rank, world, self.seed if shuffle else None)

    def dataset(self, split: str) -> SentenceDataset:
        """The map-style dataset of `split` for this DataModule's `unit`."""
        size = self.split_size(split)
        lengths = None
        if self.unit == "image":
            counts = self.source.image_counts(split)
            lengths = counts if self.max_images is None else np.minimum(counts, self.max_images)
        return SentenceDataset(size, partial(self.sentence, split), partial(self.image, split), lengths)

    @property
    def collate(self) -> Callable[[list[dict]], ImageBatch | SentenceBatch]:
        return collate_sentences if self.unit == "sentence" else collate_images

    def _loader(self, dataset: SentenceDataset | SentenceStream, sampler=None) -> DataLoader:
        if isinstance(dataset, SentenceStream):
            return self._stream_loader(dataset)
        return (DataLoader if sampler is None else TrainLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            persistent_workers=self.num_workers > 0,
            # its own generator: creating an iterator (every epoch, and once more on resume) then draws nothing
            # from the global RNG, which training (quantizer restarts) uses and checkpoints
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _stream_loader(self, dataset: SentenceStream) -> DataLoader:
        """Training streams learn the epoch from the trainer before each pass; evaluation streams need none."""
        kwargs = {"batch_size": self.batch_size, "num_workers": self.num_workers, "collate_fn": self.collate}
        if dataset.shuffle_seed is None:
            return DataLoader(dataset, **kwargs)
        return StreamLoader(dataset, lambda: self.trainer.current_epoch if self.trainer is not None else 0, **kwargs)

    def _split_data(self, split: str) -> SentenceDataset | SentenceStream:
        return self.stream(split) if self.source.streaming else self.dataset(split)

    def train_dataloader(self) -> DataLoader:
        if self.source.streaming:
            return self._loader(self.stream("train", shuffle=True))
        dataset = self.dataset("train")
        return self._loader(dataset, self.order.new_sampler(len(dataset), self.trainer))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._split_data("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._split_data("test"))

    def predict_dataloader(self) -> DataLoader:
        if self._units is None:  # a plain predict; tokenizing hands its work units over first (predict_units)
            if self.source.streaming:  # each rank and worker its own shards
                return self._loader(self.stream(self.predict_split))
            return self._loader(self.dataset(self.predict_split))
        units, claims = self._units
        dataset = UnitSentences(units, claims, self.unit_items, self.batch_size, collate_sentences, self.image_size)
        return unit_loader(dataset, self.num_workers)

    def state_dict(self) -> dict:
        """Where training is in its order (checkpointed by Lightning)."""
        return self.order.state_dict(self.trainer)

    def load_state_dict(self, state_dict: dict) -> None:
        self.order.load_state_dict(state_dict)
