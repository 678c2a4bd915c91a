"""Tokenizing's predict data: the sentence DataModule yields the units it can claim, whole, as `UnitBatch`es."""

from __future__ import annotations

import json
import os

import pytest
import torch

from datamodules import BuiltinSource, VisualSentenceDataModule
from lvm_pl.batches import UnitBatch
from lvm_pl.claims import Claims
from lvm_pl.images import to_tensor


def _data(num_workers: int) -> VisualSentenceDataModule:
    source = BuiltinSource(splits={"train": 11, "val": 0, "test": 0}, sequence_length=(2, 3), category_size=(2, 3))
    return VisualSentenceDataModule(source, image_size=16, unit="sentence", batch_size=2, num_workers=num_workers)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_units_come_whole_in_their_own_batches_and_each_once(tmp_path, num_workers):
    dm = _data(num_workers)
    units = dm.work_units("train", 3)
    assert [(u.name, u.start, u.stop) for u in units] == [
        ("train-000000", 0, 3),
        ("train-000001", 3, 6),
        ("train-000002", 6, 9),
        ("train-000003", 9, 11),
    ]
    claims = Claims(tmp_path, lease_s=60)
    (tmp_path / "train-000001.idx.npz").write_bytes(b"done")  # a unit finished earlier is not served again
    dm.predict_units(units, claims)
    seen: dict[str, list[int]] = {}
    images = {}
    for batch in dm.predict_dataloader():
        assert isinstance(batch, UnitBatch) and len(batch) <= 2
        assert batch.unit not in seen or not seen[batch.unit][-1] < 0, "a batch after its unit's last"
        owner = json.loads((tmp_path / f"{batch.unit}.claim").read_text())
        assert owner["pid"] == os.getpid(), "workers claim units for the main process"
        seen.setdefault(batch.unit, []).extend(batch.index.tolist())
        images |= {i: batch.images[b, : batch.num_images[b]] for b, i in enumerate(batch.index.tolist())}
        if batch.last:
            seen[batch.unit].append(-1)
    assert seen == {"train-000000": [0, 1, 2, -1], "train-000002": [6, 7, 8, -1], "train-000003": [9, 10, -1]}
    for i in (0, 10):  # what the modules see of a sentence, through the unit path as through the map-style one
        assert torch.equal(images[i], torch.stack([to_tensor(x) for x in dm.sentence("train", i).images]))
