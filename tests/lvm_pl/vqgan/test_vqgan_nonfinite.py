"""Non-finite losses in the VQGAN stage: `non_finite: stop` ends the run naming the step and the terms and leaves the
last good checkpoint as `last.ckpt`; `non_finite: skip` drops that step's update (weights, codebook, usage window
untouched) and trains on."""

from __future__ import annotations

import pytest
import torch
from helpers import cpu_trainer
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from datamodules.sentences import collate_images
from lvm_pl.batches import ImageBatch
from lvm_pl.finite import NonFiniteLossError
from lvm_pl.vqgan.autoencoder import Autoencoder
from lvm_pl.vqgan.discriminators import PatchGAN
from lvm_pl.vqgan.losses import VQGANLoss
from lvm_pl.vqgan.module import VQGAN
from lvm_pl.vqgan.quantizers import VectorQuantizer

BAD_STEP = 5


class PoisonedVQGAN(VQGAN):
    """A VQGAN whose input images turn NaN at optimizer step BAD_STEP (stands in for corrupt data or a diverging
    encoder): every loss term and the quantizer's latents are NaN then."""

    def training_step(self, batch: ImageBatch, batch_idx: int):
        if self.global_step == BAD_STEP:
            batch = ImageBatch(batch.images * float("nan"), batch.kinds)
        return super().training_step(batch, batch_idx)


class StateLog(Callback):
    """Copies of the whole module state (weights, codebook, usage window) after every batch."""

    def __init__(self) -> None:
        self.after: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def _fit(tmp_path, policy: str, max_steps: int) -> tuple[Trainer, StateLog]:
    torch.manual_seed(0)
    images = [{"image": torch.rand(3, 8, 8) * 2 - 1, "kind": "single"} for _ in range(8)]
    model = PoisonedVQGAN(
        autoencoder=Autoencoder([8, 8], layers_per_block=1, latent_channels=4, norm_num_groups=4),
        quantizer=VectorQuantizer(16, 4, init_from_data=True, dead_code_threshold=0.5),
        loss=VQGANLoss(PatchGAN(channels=8, num_layers=1, norm="group"), disc_start=0),  # g and d checked too
        lr=1e-3,
        non_finite=policy,
    )
    log = StateLog()
    trainer = cpu_trainer(
        max_steps=max_steps,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True), log],
        limit_val_batches=0,
    )
    trainer.fit(model, DataLoader(images, batch_size=2, collate_fn=collate_images))
    return trainer, log


def test_nan_loss_stops_naming_step_and_terms_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match=rf"non-finite loss at step {BAD_STEP}: train/rec=nan, .*train/d="):
        _fit(tmp_path, "stop", max_steps=10)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 4  # the checkpoint of step 4, written before the bad step; nothing after it
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_nan_loss_with_skip_leaves_the_state_and_trains_on(tmp_path):
    with pytest.warns(UserWarning, match=rf"step {BAD_STEP}: train/rec=nan.* - step skipped"):
        trainer, log = _fit(tmp_path, "skip", max_steps=8)
    assert len(log.after) == 8 and trainer.global_step == 8
    same = [all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(log.after[:-1], log.after[1:], strict=True)]
    assert same == [i + 1 == BAD_STEP for i in range(7)]  # only the poisoned batch left everything untouched
    assert all(torch.isfinite(v).all() for v in log.after[-1].values() if v.is_floating_point())
