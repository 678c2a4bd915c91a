"""Two DDP ranks (CPU, gloo, spawned processes) receive disjoint sentences, each exactly as the source makes it."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from helpers import cpu_trainer
from lightning.pytorch import LightningModule

from datamodules import BuiltinSource, VisualSentenceDataModule
from lvm_pl.batches import SentenceBatch
from lvm_pl.images import to_tensor


def fingerprint(images: torch.Tensor) -> str:
    return hashlib.sha1(images.contiguous().numpy().tobytes()).hexdigest()


class Recorder(LightningModule):
    """Writes, per rank and split, the sentence indices it was given and a hash of their images."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: dict[str, dict[int, str]] = {"train": {}, "val": {}}

    def _record(self, split: str, batch: SentenceBatch) -> None:
        for b, i in enumerate(batch.index.tolist()):
            self.seen[split][i] = fingerprint(batch.images[b, : batch.num_images[b]])

    def training_step(self, batch, batch_idx):
        self._record("train", batch)
        return self.weight * batch.images.mean()

    def validation_step(self, batch, batch_idx):
        self._record("val", batch)

    def on_fit_end(self) -> None:
        with open(f"{self.out}/rank{self.global_rank}.json", "w") as f:
            json.dump(self.seen, f)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_two_ranks_get_disjoint_sentences(tmp_path):
    source = BuiltinSource(splits={"train": 12, "val": 8, "test": 0}, sequence_length=(2, 4))
    dm = VisualSentenceDataModule(source, image_size=16, unit="sentence", batch_size=2, seed=5)
    trainer = cpu_trainer(devices=2, strategy="ddp_spawn", max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(Recorder(str(tmp_path)), datamodule=dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for split, size in (("train", 12), ("val", 8)):
        a, b = (set(map(int, r[split])) for r in ranks)
        assert a and b and not (a & b), (split, a, b)
        assert a | b == set(range(size))
        for r in ranks:
            for i, digest in r[split].items():
                expected = torch.stack([to_tensor(x) for x in dm.sentence(split, int(i)).images])
                assert digest == fingerprint(expected)
