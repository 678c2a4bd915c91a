"""Non-finite losses in the LVM stage: `non_finite: stop` ends the run naming the step and the term and leaves the
last good checkpoint as `last.ckpt`; `non_finite: skip` drops that step's update and trains on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import cpu_trainer
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.tokens import TokenDataModule
from lvm_pl import shards
from lvm_pl.batches import TokenBatch
from lvm_pl.finite import NonFiniteLossError
from lvm_pl.lvm.module import LVM
from lvm_pl.lvm.settings import OptimSettings
from lvm_pl.tokens import TokenLayout

LAYOUT = TokenLayout(codebook_size=32, tokens_per_image=4, num_special=4)
SMALL = {"n_layer": 1, "n_embd": 32, "n_head": 2, "intermediate_size": 64}
BAD_STEP = 5


class PoisonedLVM(LVM):
    """An LVM whose loss turns NaN at optimizer step BAD_STEP (stands in for a diverging run)."""

    def _loss(self, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        loss, logits = super()._loss(batch)
        return (loss * float("nan") if self.global_step == BAD_STEP else loss), logits


class WeightLog(Callback):
    """Copies of the weights after every batch, to see which batches changed them."""

    def __init__(self) -> None:
        self.after: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})


def _fit(tmp_path, policy: str, max_steps: int) -> tuple[Trainer, WeightLog]:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, LAYOUT.codebook_size, size=(2, LAYOUT.tokens_per_image)) for _ in range(20)]
    shards.write_split(tmp_path / "data", "train", LAYOUT, images)
    log = WeightLog()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True)
    trainer = cpu_trainer(
        max_steps=max_steps, enable_checkpointing=True, callbacks=[checkpoint, log], limit_val_batches=0
    )
    model = PoisonedLVM(preset="tiny", overrides=SMALL, non_finite=policy, optim=OptimSettings(warmup_steps=0))
    trainer.fit(model, TokenDataModule(train=str(tmp_path / "data"), seq_len=8, batch_size=2))
    return trainer, log


def test_nan_loss_stops_naming_step_and_term_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match=rf"non-finite loss at step {BAD_STEP}: train/loss=nan"):
        _fit(tmp_path, "stop", max_steps=10)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 4  # the checkpoint of step 4, written before the bad step; nothing after it
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert LVM.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt").layout == LAYOUT


def test_nan_loss_with_skip_leaves_the_weights_and_trains_on(tmp_path):
    with pytest.warns(UserWarning, match=rf"step {BAD_STEP}: train/loss=nan - step skipped"):
        trainer, log = _fit(tmp_path, "skip", max_steps=8)
    assert len(log.after) == 8 and trainer.global_step == 8
    same = [all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(log.after[:-1], log.after[1:], strict=True)]
    assert same == [i + 1 == BAD_STEP for i in range(7)]  # only the poisoned batch left the weights untouched
    assert all(torch.isfinite(v).all() for v in log.after[-1].values())
