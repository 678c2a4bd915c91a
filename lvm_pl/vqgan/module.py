"""The VQGAN LightningModule: fit (one optimizer, two parameter groups), validate/test metrics, predict -> tokens."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch import LightningModule

from lvm_pl.atomic import write_json
from lvm_pl.batches import ImageBatch, SentenceBatch, TokenizedSentences
from lvm_pl.console import UserError, say
from lvm_pl.finite import NonFinitePolicy, check_finite
from lvm_pl.images import grid, to_uint8
from lvm_pl.metrics import frechet_inception_distance, inception_weights, psnr, ssim
from lvm_pl.optim import adamw, warmup_cosine_schedule
from lvm_pl.tensorboard import tensorboard
from lvm_pl.vqgan.autoencoder import Autoencoder
from lvm_pl.vqgan.losses import VQGANLoss
from lvm_pl.vqgan.quantizers import Quantizer


class VQGAN(LightningModule):
    """Autoencoder + quantizer + loss. Images are [B, 3, H, W] in [-1, 1]; tokens are LongTensor [B, H/f, W/f].

    `input_range` is the pixel range the autoencoder itself works in: [-1, 1] for ours, [0, 1] for the released
    open-muse/amused tokenizer. Images are mapped into it before encoding and decodes are clamped to it and mapped
    back, inside this module, so callers always see [-1, 1].
    """

    def __init__(
        self,
        autoencoder: Autoencoder,
        quantizer: Quantizer,
        loss: VQGANLoss,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.5, 0.9),
        disc_lr: float | None = None,
        disc_betas: tuple[float, float] | None = None,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        ema_decay: float | None = None,
        image_log_every_n_steps: int = 500,
        num_logged_images: int = 8,
        non_finite: NonFinitePolicy = "stop",
        fid_weights: str | None = None,
        input_range: tuple[float, float] = (-1.0, 1.0),
    ):
        """`disc_lr`/`disc_betas` default to the autoencoder's; `ema_decay` keeps an EMA copy of the autoencoder
        that validation, test, predict and export use. `non_finite`: a NaN/Inf loss term stops the run naming the
        step and term (`stop`), or that step's update is dropped (`skip`). `fid_weights`: torch-fidelity's Inception
        weights for the test's rFID (default: torch hub's cache; without them rFID is skipped with a note)."""
        super().__init__()
        self.save_hyperparameters(ignore=["fid_weights"])  # a run-time input: the test command decides
        self.fid_weights = fid_weights
        if not input_range[0] < input_range[1]:
            raise UserError(f"model.input_range={list(input_range)}: needs low < high, e.g. [-1, 1] or [0, 1]")
        self.input_range = (float(input_range[0]), float(input_range[1]))
        self._fid: torch.nn.Module | None = None
        self._fid_note = ""
        if autoencoder.embed_dim != quantizer.embed_dim:
            raise UserError(
                f"model.init_args.quantizer.init_args.embed_dim={quantizer.embed_dim} must equal the autoencoder's "
                f"embed_dim={autoencoder.embed_dim}"
            )
        self.autoencoder = autoencoder
        self.quantizer = quantizer
        self.loss = loss
        self.ema = copy.deepcopy(autoencoder).requires_grad_(False) if ema_decay else None
        self._eval_counts: torch.Tensor | None = None
        self._test_sums: dict[str, torch.Tensor] = {}

    @property
    def codebook_size(self) -> int:
        """Number of distinct token ids (0..K-1)."""
        return self.quantizer.codebook_size

    @property
    def downsample_factor(self) -> int:
        """Pixels per token along each side."""
        return self.autoencoder.downsample_factor

    def _eval_autoencoder(self) -> Autoencoder:
        return self.ema if self.ema is not None and not self.training else self.autoencoder

    def _to_input_range(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the autoencoder's `input_range` (identity for [-1, 1])."""
        low, high = self.input_range
        return images if (low, high) == (-1.0, 1.0) else low + (images + 1) * ((high - low) / 2)

    def _from_input_range(self, pixels: torch.Tensor) -> torch.Tensor:
        """The autoencoder's output in `input_range` -> images in [-1, 1] (not clamped: training needs gradients)."""
        low, high = self.input_range
        return pixels if (low, high) == (-1.0, 1.0) else (pixels - low) * (2 / (high - low)) - 1

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> LongTensor [B, H/f, W/f]."""
        return self.quantizer(self._eval_autoencoder().encode(self._to_input_range(images))).indices

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """LongTensor [B, h, w] -> images [B, 3, h*f, w*f] in [-1, 1] (clamped to `input_range` first)."""
        ae = self._eval_autoencoder()
        quantized = self.quantizer.embed(indices).to(ae.post_quant_conv.weight.dtype)
        return self._from_input_range(ae.decode(quantized).clamp(*self.input_range)).clamp(-1, 1)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """images -> decode(encode(images))."""
        return self.decode(self.encode(images))

    def _forward(self, images: torch.Tensor, ae: Autoencoder):
        out = self.quantizer(ae.encode(self._to_input_range(images)))
        return self._from_input_range(ae.decode(out.quantized)), out

    def training_step(self, batch: ImageBatch, batch_idx: int) -> torch.Tensor | None:
        images = batch.images
        recon, q = self._forward(images, self.autoencoder)
        total, logs = self.loss(images, recon, q.loss, self.autoencoder.last_layer, self.global_step)
        terms = {f"train/{k}": logs[k] for k in ("rec", "perceptual", "codebook", "g", "d", "total") if k in logs}
        if not check_finite(terms, self.global_step, self.hparams.non_finite):
            return None  # Lightning skips backward and the optimizer step for this batch
        self.quantizer.record(q.counts)
        logs |= self.quantizer.usage_stats()
        self.log_dict({f"train/{k}": v for k, v in logs.items()})
        for i, group in enumerate(self.trainer.optimizers[0].param_groups if self._trainer else []):
            self.log(f"lr/{('autoencoder', 'discriminator')[i]}", group["lr"])
        if self.global_step % self.hparams.image_log_every_n_steps == 0:
            self._log_grid("train/reconstructions", images, recon)
        return total

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # here, not in on_train_batch_end: a checkpoint saved at this step (callbacks run before the module's
        # on_train_batch_end) must already hold this step's EMA, or a resumed run drops one update
        if self.ema is not None:
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.autoencoder.parameters(), strict=True):
                    e.lerp_(p.detach(), 1 - self.hparams.ema_decay)
                for e, b in zip(self.ema.buffers(), self.autoencoder.buffers(), strict=True):
                    e.copy_(b)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning does not checkpoint RNG state; training draws from it (quantizer init and dead-code restarts)
        states = _collect_rng_states()
        name, keys, pos, has_gauss, gauss = states["numpy"]
        # numpy's key array as a list: `torch.load(weights_only=True)` (LightningCLI's read) rejects ndarrays
        states["numpy"] = (name, keys.tolist(), int(pos), int(has_gauss), float(gauss))
        checkpoint["rng_states"] = states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # only a resumed fit continues the RNG stream; loading a tokenizer must not reset the caller's RNG
        if self._trainer is not None and self.trainer.state.fn == "fit" and "rng_states" in checkpoint:
            states = dict(checkpoint["rng_states"])
            name, keys, *rest = states["numpy"]
            states["numpy"] = (name, np.asarray(keys, dtype=np.uint32), *rest)
            _set_rng_states(states)

    def _evaluate(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images = batch.images
        recon, q = self._forward(images, self._eval_autoencoder())
        recon = recon.clamp(-1, 1)
        counts = q.counts.float()
        self._eval_counts = counts if self._eval_counts is None else self._eval_counts + counts
        return images, recon, q.indices

    def on_validation_epoch_start(self) -> None:
        self._eval_counts = None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images, recon, _ = self._evaluate(batch)
        n = images.shape[0]
        self.log("val/psnr", psnr(recon, images).mean(), prog_bar=True, batch_size=n, sync_dist=True)
        self.log("val/ssim", ssim(recon, images).mean(), batch_size=n, sync_dist=True)
        self.log("val/rec", (recon - images).abs().mean(), batch_size=n, sync_dist=True)
        if batch_idx == 0:
            self._log_grid("val/reconstructions", images, recon)

    def on_validation_epoch_end(self) -> None:
        if self._eval_counts is None:
            return
        counts = self.trainer.strategy.reduce(self._eval_counts, reduce_op="sum")
        stats = self.quantizer.usage_stats(counts)
        self.log_dict({f"val/{k}": v for k, v in stats.items()}, prog_bar=True)
        writer = tensorboard(self.loggers)
        if writer is not None:
            writer.add_histogram("val/code_counts", counts.cpu(), self.global_step)

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate", "test") and self.loss.perceptual is not None:
            self.loss.perceptual.load_backbone()

    def on_test_epoch_start(self) -> None:
        self._eval_counts = None
        self._test_sums = {}
        weights, self._fid_note = inception_weights(self.fid_weights)
        self._fid = frechet_inception_distance(weights).to(self.device) if weights is not None else None

    def test_step(self, batch: dict, batch_idx: int) -> None:
        images, recon, _ = self._evaluate(batch)
        values = {"psnr": psnr(recon, images), "ssim": ssim(recon, images)}
        lp = self.loss.perceptual_distance(images, recon) if self._lpips_pretrained() else None
        if lp is not None:
            values["lpips"] = lp
        if self._fid is not None:
            self._fid.update((images.float() + 1) / 2, real=True)
            self._fid.update((recon.float() + 1) / 2, real=False)
        for k, v in values.items():
            self._test_sums[k] = self._test_sums.get(k, 0.0) + v.double().sum()
        self._test_sums["count"] = self._test_sums.get("count", 0.0) + torch.tensor(
            float(images.shape[0]), device=images.device, dtype=torch.float64
        )

    def _lpips_pretrained(self) -> bool:
        return self.loss.perceptual is not None and self.loss.perceptual.pretrained

    def on_test_epoch_end(self) -> None:
        sums = {k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in self._test_sums.items()}
        count = float(sums.pop("count", torch.tensor(0.0)))
        results: dict[str, object] = {k: float(v) / max(count, 1.0) for k, v in sums.items()}
        counts = self.trainer.strategy.reduce(self._eval_counts, reduce_op="sum")
        results |= {k: float(v) for k, v in self.quantizer.usage_stats(counts).items()}
        results["images"] = int(count)
        notes = []
        if "lpips" not in results:
            notes.append("lpips skipped: needs the pretrained VGG16 backbone (perceptual pretrained: true)")
        if self._fid is not None:
            results["rfid"] = float(self._fid.compute())  # torchmetrics gathers every rank's statistics
            self._fid = None
        else:
            notes.append(self._fid_note)
        results["notes"] = notes
        self.log_dict({f"test/{k}": float(v) for k, v in results.items() if isinstance(v, float)})
        if self.trainer.is_global_zero:
            out = Path(self.trainer.log_dir or ".") / "test_results.json"
            write_json(out, results)
            say(f"test results: {out}")

    def predict_step(self, batch: SentenceBatch, batch_idx: int) -> TokenizedSentences:
        """A sentence batch -> its tokens [B, N, h, w]; padding images get 0."""
        if not isinstance(batch, SentenceBatch):
            raise UserError("data.unit: tokenizing (predict) needs whole sentences (data.init_args.unit: sentence)")
        images, num = batch.images, batch.num_images
        b, n, _, h, w = images.shape
        f = self.downsample_factor
        real = torch.arange(n, device=images.device)[None] < num.to(images.device)[:, None]  # [B, N]
        tokens = torch.zeros(b, n, h // f, w // f, dtype=torch.long, device=images.device)
        tokens[real] = self.encode(images[real])  # all real images of the batch in one call
        return TokenizedSentences(tokens, num, batch.index, batch.kinds)

    def _log_grid(self, tag: str, images: torch.Tensor, recon: torch.Tensor) -> None:
        writer = tensorboard(self.loggers)
        if writer is None or not self.trainer.is_global_zero:
            return
        k = self.hparams.num_logged_images
        rows = [list(to_uint8(images[:k])), list(to_uint8(recon[:k]))]  # inputs above, reconstructions below
        writer.add_image(tag, grid(rows), self.global_step, dataformats="HWC")

    def configure_optimizers(self):
        """AdamW following the strategy (`lvm_pl.optim.adamw`) with two groups (autoencoder + quantizer,
        discriminator); warmup then cosine to min_lr_ratio."""
        hp = self.hparams
        ae_params = [p for m in (self.autoencoder, self.quantizer) for p in m.parameters() if p.requires_grad]
        groups = [
            {"params": ae_params, "lr": hp.lr, "betas": tuple(hp.betas)},
            {
                "params": [p for p in self.loss.discriminator.parameters() if p.requires_grad],
                "lr": hp.disc_lr or hp.lr,
                "betas": tuple(hp.disc_betas or hp.betas),
            },
        ]
        optimizer = adamw(groups, self.trainer.strategy, weight_decay=hp.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = warmup_cosine_schedule(optimizer, hp.warmup_steps, total, hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": schedule}
