"""Fast in-process checks of the VQGAN's exact resume (the kill -9 version: tests/cli/test_reliability_resume.py):
the image order of VisualSentenceDataModule continues mid-epoch, and a fit stopped at a checkpoint and resumed - with
the global RNG disturbed in between - ends with the same weights, buffers and optimizer state, bit for bit."""

from __future__ import annotations

import hashlib
import io

import pytest
import torch
from helpers import cpu_trainer
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules import BuiltinSource, VisualSentenceDataModule
from lvm_pl.vqgan.autoencoder import Autoencoder
from lvm_pl.vqgan.discriminators import PatchGAN
from lvm_pl.vqgan.losses import VQGANLoss
from lvm_pl.vqgan.module import VQGAN
from lvm_pl.vqgan.quantizers import VectorQuantizer


def _data() -> VisualSentenceDataModule:
    # 3 sentences of 2-4 images at 16 px (14 images), batches of 3: 5 batches an epoch, the last one short
    source = BuiltinSource(splits={"train": 3, "val": 0, "test": 0}, sequence_length=(2, 4))
    return VisualSentenceDataModule(source, image_size=16, batch_size=3, seed=11)


class StopAfter(Callback):
    """Ends the fit after `step` optimizer steps, like a kill right after a checkpoint (max_steps stays the same, so
    the LR schedule, which spans max_steps, does too)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        trainer.should_stop = trainer.global_step >= self.step


def _trainer(tmp_path, max_steps: int, stop: int | None = None) -> Trainer:
    callbacks = []
    if stop:
        callbacks = [StopAfter(stop), ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=stop)]
    return cpu_trainer(
        max_steps=max_steps,
        enable_checkpointing=bool(stop),
        callbacks=callbacks,
        limit_val_batches=0,
        deterministic=True,
    )


class ImageRecorder(LightningModule):
    """Remembers a digest of every training image, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[str] = []

    def training_step(self, batch, batch_idx):
        self.seen += [hashlib.sha1(x.numpy().tobytes()).hexdigest() for x in batch.images]
        return self.w**2 + batch.images.mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_train_order_is_shuffled_per_epoch_and_resumes_mid_epoch(tmp_path):
    reference = ImageRecorder()
    _trainer(tmp_path / "ref", max_steps=10).fit(reference, _data())
    per_epoch = len(_data().dataset("train"))
    assert len(reference.seen) >= 2 * per_epoch
    assert reference.seen[:per_epoch] != reference.seen[per_epoch : 2 * per_epoch]  # a new permutation each epoch
    assert sorted(reference.seen[:per_epoch]) == sorted(reference.seen[per_epoch : 2 * per_epoch])

    first = ImageRecorder()
    _trainer(tmp_path, max_steps=10, stop=4).fit(first, _data())
    rest = ImageRecorder()
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    _trainer(tmp_path / "rest", max_steps=10).fit(rest, _data(), ckpt_path=str(ckpt))
    assert first.seen + rest.seen == reference.seen


def test_changed_order_warns_and_restarts_the_epoch():
    dm = _data()
    dm.load_state_dict({"epoch": 2, "consumed": 3, "num_items": 999, "world_size": 1, "seed": 11})
    with pytest.warns(UserWarning, match="epoch restarts from its first item"):
        sampler = dm.train_dataloader().sampler
    assert sampler.epoch == 2 and len(list(sampler)) == len(dm.dataset("train"))


def _vqgan() -> VQGAN:
    """A tiny VQGAN that draws random numbers every step (dead-code restarts) and trains its GAN from step 0."""
    return VQGAN(
        autoencoder=Autoencoder([8, 16], layers_per_block=1, latent_channels=8, norm_num_groups=4),
        # usage EMAs start at 1 and decay by 0.99 a step: a code unused for 2 steps restarts, drawing from the RNG
        quantizer=VectorQuantizer(64, 8, init_from_data=True, dead_code_threshold=0.985, usage_window=4),
        loss=VQGANLoss(PatchGAN(channels=8, num_layers=1, norm="group"), disc_start=0, lecam_weight=0.1),
        lr=1e-3,
        warmup_steps=2,
        ema_decay=0.9,
    )


def _state(model: VQGAN, trainer: Trainer) -> dict:
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": trainer.optimizers[0].state_dict(),
        "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
    }


def _assert_equal(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where}: max abs diff {(a.float() - b.float()).abs().max()}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_stopped_and_resumed_fit_equals_uninterrupted_bit_for_bit(tmp_path):
    seed_everything(3)
    reference = _vqgan()
    trainer = _trainer(tmp_path / "ref", max_steps=7)
    trainer.fit(reference, _data())
    expected = _state(reference, trainer)

    seed_everything(3)
    _trainer(tmp_path, max_steps=7, stop=4).fit(_vqgan(), _data())
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    buffer = io.BytesIO()
    torch.save(saved["rng_states"], buffer)
    buffer.seek(0)
    rng = torch.load(buffer, weights_only=True)  # LightningCLI reads --ckpt_path with weights_only=True
    assert {"torch", "numpy", "python"} <= set(rng)
    assert int(saved["state_dict"]["quantizer.next_slot"]) == 4  # the usage window's position travels along

    seed_everything(99)  # a resumed process starts from another RNG state; the checkpoint's must win
    resumed = _vqgan()
    trainer = _trainer(tmp_path / "rest", max_steps=7)
    trainer.fit(resumed, _data(), ckpt_path=str(ckpt), weights_only=False)  # hparams hold modules here
    assert trainer.global_step == 7
    _assert_equal(expected, _state(resumed, trainer))
