"""The LVM LightningModule: next-token cross-entropy over packed visual-sentence windows with a LLaMA decoder.

The vocabulary is never configured independently of the tokenizer: the token layout comes from the datamodule's
`layout` (token shards), from the tokenizer checkpoint (on-the-fly mode), or from the checkpoint being loaded, and is
stored in the hyper-parameters so `LVM.load_from_checkpoint(path)` rebuilds the model without data.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import grad_norm

from lvm_pl import images as image_utils
from lvm_pl.batches import IGNORE_INDEX, PromptBatch, Sentence, SentenceBatch, TokenBatch, batch_size, batch_tokens
from lvm_pl.console import UserError, say, warn
from lvm_pl.finite import NonFinitePolicy, check_finite
from lvm_pl.lvm.config import LVMConfig
from lvm_pl.lvm.evaluation import TestEvaluation
from lvm_pl.lvm.evaluation.metrics import batch_sentences, sentence_frames
from lvm_pl.lvm.generation import GenerationSettings, predict_batch
from lvm_pl.lvm.model import LLaMA, RMSNorm
from lvm_pl.lvm.settings import EvalSettings, OptimSettings, settings
from lvm_pl.optim import adamw, warmup_cosine_schedule
from lvm_pl.safe_load import load_torch_file
from lvm_pl.stage_data import stage_data
from lvm_pl.tensorboard import tensorboard
from lvm_pl.tokens import TokenLayout, resolve_layout

__all__ = ["LVM", "batch_size", "batch_tokens", "RENAMED"]

# arguments of the flat-argument LVM (before December 2026) -> their place now; old checkpoints are migrated, old
# config keys refused with the new name (see `migrate_hparams` and main.py)
RENAMED: dict[str, str | None] = {
    "model": "preset",
    "model_overrides": "overrides",
    "vocab_size": None,  # the vocabulary comes from the token layout (shards, tokenizer or checkpoint)
    **{k: f"optim.{k}" for k in ("lr", "min_lr", "betas", "weight_decay", "exclude_from_decay", "warmup_steps")},
    "decay_steps": "optim.decay_steps",
    **{k: f"evaluation.{k}" for k in ("num_preview", "context_frames", "next_frame_examples")},
}


def migrate_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's hyper-parameters in today's arguments (those of a flat-argument LVM moved to their groups)."""
    out = {k: v for k, v in hparams.items() if k not in RENAMED}
    for old, new in RENAMED.items():
        if old in hparams and new is not None:
            group, _, key = new.rpartition(".")
            (out.setdefault(group, {}) if group else out)[key] = hparams[old]
    return out


class LVM(LightningModule):
    """LLaMA decoder trained on visual sentences: `preset` names an `LVMConfig` preset, `overrides` change its fields.

    The token layout (vocabulary, tokens per image, special ids) is never configured: one handshake
    (`lvm_pl.tokens.resolve_layout`) takes it from the checkpoint, the token shards and the tokenizer, which must
    agree, and stores it in the hyper-parameters so `load_from_checkpoint` rebuilds the model without data.

    `init_from`: a checkpoint (e.g. from `import-hf`) whose weights and token layout start this run (weights only:
    optimizer, schedule and loops start fresh; use `--ckpt_path` to resume a run instead). `tokenizer`: the VQGAN
    checkpoint that turns images into tokens (image data) and tokens into images (previews, next-frame quality,
    prompting). `optim`, `evaluation` and `generation` group the run settings; evaluation and generation are run-time
    inputs, not model properties: checkpoints leave them out, so the test or predict config decides.

    `non_finite`: a NaN/Inf training loss stops the run naming the step (`stop`; the last checkpoint stays the last
    good one) or skips that step's update (`skip`).

    `changed_token_weight`: the training loss weight of an image token that differs from the token at its position in
    the image before it (same sentence); the others weigh 1. In a video most tokens repeat, so a plain loss (1, the
    default) is mostly won by copying; a larger weight spends the model on what moved. `train/loss` and every
    validation and test figure stay the plain cross-entropy.
    """

    def __init__(
        self,
        preset: str = "tiny",
        overrides: dict[str, Any] | None = None,
        layout: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        init_from: str | None = None,
        activation_checkpointing: bool = False,
        compile: bool = False,
        optim: OptimSettings | None = None,
        evaluation: EvalSettings | None = None,
        generation: GenerationSettings | None = None,
        non_finite: NonFinitePolicy = "stop",
        changed_token_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if changed_token_weight <= 0:
            raise UserError(f"model.init_args.changed_token_weight: {changed_token_weight} must be > 0")
        self.optim = settings(OptimSettings, optim)
        self.evaluation = settings(EvalSettings, evaluation)
        self.generation = settings(GenerationSettings, generation)
        # run-time inputs stay out of the checkpoint, so `--ckpt_path` never overrides the ones a command gives
        self.save_hyperparameters(ignore=["tokenizer", "evaluation", "generation"])
        self.hparams["optim"] = asdict(self.optim)  # plain data: checkpoints load with weights_only=True
        self.tokenizer_path = tokenizer
        self._evaluation: TestEvaluation | None = None
        self.config = LVMConfig.from_name(preset, **(overrides or {}))
        self.model: LLaMA | None = None
        self.tokenizer: torch.nn.Module | None = None
        self._layout = TokenLayout.from_dict(layout) if layout is not None else None
        self._preview: list[dict[str, torch.Tensor]] = []
        self._flops_shape: tuple[int, int] | None = None
        self.flops_per_batch: int | None = None  # ThroughputMonitor reads it; set per token-batch shape

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, **kwargs: Any) -> LVM:
        """Lightning's loading, with a flat-argument LVM's hyper-parameters migrated to today's arguments."""
        saved = load_torch_file(checkpoint_path, mmap=True)  # weights-only; a code-carrying file is refused by name
        hparams = saved.get(cls.CHECKPOINT_HYPER_PARAMS_KEY, {})
        if hparams.keys() & RENAMED.keys():
            kwargs = {**migrate_hparams(hparams), **kwargs}
            kwargs.pop("_class_path", None), kwargs.pop("_instantiator", None)
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location, weights_only=True, **kwargs)

    @property
    def layout(self) -> TokenLayout | None:
        """The token layout the vocabulary is built for (None until the handshake in `configure_model`)."""
        return self._layout

    def _load_tokenizer(self) -> torch.nn.Module:
        if self.tokenizer is None:
            from lvm_pl.vqgan import load_tokenizer

            tokenizer = load_tokenizer(self.tokenizer_path)
            tokenizer.requires_grad_(False)
            # object.__setattr__ keeps the frozen tokenizer out of state_dict, optimizer and checkpoints
            object.__setattr__(self, "tokenizer", tokenizer.eval())
        return self.tokenizer

    def _resolve_layout(self) -> TokenLayout:
        """The handshake: checkpoint (or init_from), token shards and tokenizer at the data's image size agree."""
        data = stage_data(self._trainer)
        init = None
        if self.hparams.init_from is not None:
            saved = self._init_checkpoint()[self.CHECKPOINT_HYPER_PARAMS_KEY].get("layout")
            init = TokenLayout.from_dict(saved) if saved is not None else None
        shards = data.layout if data is not None else None
        from_tokenizer = None
        if self.tokenizer_path is not None and data is not None and data.image_size is not None:
            tokenizer = self._load_tokenizer()
            from_tokenizer = TokenLayout.for_images(
                tokenizer.codebook_size, data.image_size, tokenizer.downsample_factor
            )
        where = data.describe() if data is not None else None
        return resolve_layout(
            {
                "the LVM checkpoint": self._layout,
                f"model.init_from={self.hparams.init_from}": init,
                f"the token shards ({where})": shards,
            },
            {f"model.tokenizer={self.tokenizer_path} at data.image_size={data and data.image_size}": from_tokenizer},
        )

    def configure_model(self) -> None:
        """Build the decoder once the layout is known (inside the strategy's init context: sharded under ZeRO-3)."""
        if self.model is not None:
            return
        self._layout = self._resolve_layout()
        self.hparams["layout"] = self._layout.to_dict()  # checkpoints rebuild without data
        self.config = LVMConfig.from_name(
            self.hparams.preset, **{**(self.hparams.overrides or {}), "vocab_size": self._layout.vocab_size}
        )
        if self._layout.frames_that_fit(self.config.block_size) < 1:
            least = self._layout.image_start(1) - 1  # BOS and the image, less its last token (predicted, never fed)
            raise UserError(
                f"model block_size={self.config.block_size} holds no whole image of {self._layout.tokens_per_image}"
                f" tokens; set model.init_args.overrides.block_size to at least {least}"
            )
        self.model = LLaMA(self.config)
        self.model.activation_checkpointing = self.hparams.activation_checkpointing
        if self.hparams.init_from is not None:
            self._load_init_weights()
        if self.hparams.compile:
            for block in self.model.layers:
                block.compile()  # in place: parameter names (and checkpoints) stay those of the eager model

    def _init_checkpoint(self) -> dict:
        return load_torch_file(self.hparams.init_from, f"model.init_from={self.hparams.init_from}", mmap=True)

    def _load_init_weights(self) -> None:
        state = self._init_checkpoint()["state_dict"]
        weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        try:
            self.model.load_state_dict(weights)
        except RuntimeError as err:
            raise UserError(
                f"model.init_from={self.hparams.init_from}: weights do not fit preset={self.hparams.preset!r}"
                f" with overrides={self.hparams.overrides} ({str(err).splitlines()[1].strip()})"
            ) from None
        say(f"initialised the LVM from {self.hparams.init_from}")
        # the weights are this run's from now on: its checkpoints must not need (or re-read) the source file
        self.hparams["init_from"] = None

    def forward(self, idx: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] for token ids [B, T]."""
        return self.model(idx, doc_ids=doc_ids)

    def token_batch(self, batch: SentenceBatch | TokenBatch) -> TokenBatch:
        """A token batch as is; a sentence batch tokenized into one sentence per row, its whole sentences listed."""
        if isinstance(batch, TokenBatch):
            return batch
        if not isinstance(batch, SentenceBatch):
            raise UserError(f"data: the LVM trains on token or sentence batches, not {type(batch).__name__}")
        images, counts = batch.images, batch.num_images  # [B, N, 3, H, W], [B]
        self._check_image_size(images.shape[-1])
        B, N = images.shape[:2]
        with torch.no_grad():
            codes = self._load_tokenizer().encode(images.flatten(0, 1)).view(B, N, -1)  # [B, N, h*w]
        # a sentence longer than the context keeps its most recent whole frames (the paper's sliding window)
        fit = self._layout.frames_that_fit(self.config.block_size, with_eos=True)
        kept = [min(int(counts[b]), fit) for b in range(B)]
        rows = [self._layout.sentence(codes[b, int(counts[b]) - kept[b] : int(counts[b])]) for b in range(B)]
        length = max(len(r) for r in rows) - 1
        input_ids = torch.full((B, length), self._layout.pad_id, dtype=torch.long, device=images.device)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for b, r in enumerate(rows):
            input_ids[b, : len(r) - 1], labels[b, : len(r) - 1] = r[:-1], r[1:]
        sentences = [Sentence(b, 0, kept[b], batch.kinds[b], int(batch.index[b])) for b in range(B)]
        return TokenBatch(input_ids, labels, torch.zeros_like(input_ids), sentences=sentences)

    def _loss(self, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(batch.input_ids, doc_ids=batch.doc_ids)  # [B, T, V]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=IGNORE_INDEX)
        return loss, logits

    def _changed_tokens(self, batch: TokenBatch) -> torch.Tensor:
        """[B, T] bool: labels that are image tokens unlike the token at their position one image earlier."""
        n, codes = self._layout.tokens_per_image, self._layout.codebook_size
        labels, docs = batch.labels, batch.doc_ids
        before = F.pad(labels, (n, 0), value=IGNORE_INDEX)[:, : labels.shape[1]]  # the label n positions earlier
        same_doc = F.pad(docs, (n, 0), value=-1)[:, : docs.shape[1]] == docs
        image = lambda t: (t >= 0) & (t < codes)  # noqa: E731
        return image(labels) & image(before) & same_doc & (labels != before)

    def _training_loss(self, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to step on, the plain cross-entropy): weighted by `changed_token_weight` where it is not 1."""
        weight = float(self.hparams.changed_token_weight)
        if weight == 1.0:
            loss, _ = self._loss(batch)
            return loss, loss
        logits = self.model(batch.input_ids, doc_ids=batch.doc_ids)  # [B, T, V]
        flat = batch.labels.flatten()
        nll = F.cross_entropy(logits.flatten(0, 1).float(), flat, ignore_index=IGNORE_INDEX, reduction="none")
        valid = (flat != IGNORE_INDEX).float()
        weights = valid + (weight - 1.0) * self._changed_tokens(batch).flatten().float()
        plain = (nll * valid).sum() / valid.sum().clamp(min=1)
        return (nll * weights).sum() / weights.sum().clamp(min=1), plain.detach()

    def setup(self, stage: str) -> None:
        """The window handshake, before any model is built: token data without its own seq_len takes the model's
        block_size; a longer window than the model holds stops here, naming both values."""
        data = stage_data(self.trainer)
        if data is not None:
            data.use_context(self.config.block_size)
        self._data_window()

    def on_fit_start(self) -> None:
        seq_len = self._data_window()
        if seq_len is not None and seq_len < self.config.block_size:
            warn(
                f"data.seq_len={seq_len} is shorter than the model's block_size={self.config.block_size}: positions"
                " past the training window are never trained, yet test and predict fill the whole block_size;"
                f" set model.init_args.overrides.block_size to {seq_len}"
            )

    def _data_window(self) -> int | None:
        """The data's window length, refused (one line naming both values) when the model cannot hold it."""
        data = stage_data(self.trainer)
        seq_len = data.seq_len if data is not None else None
        if seq_len is not None and seq_len > self.config.block_size:
            raise UserError(
                f"data.seq_len={seq_len} is longer than the model's block_size={self.config.block_size}: leave"
                f" data.init_args.seq_len unset (windows then follow the model) or set it to {self.config.block_size},"
                f" or set model.init_args.overrides.block_size to {seq_len}"
            )
        return seq_len

    def training_step(self, batch: SentenceBatch | TokenBatch, batch_idx: int) -> torch.Tensor | None:
        batch = self.token_batch(batch)
        loss, plain = self._training_loss(batch)
        if not check_finite({"train/loss": loss}, self.global_step, self.hparams.non_finite):
            return None  # Lightning skips backward and the optimizer step for this batch
        self.log("train/loss", plain, prog_bar=True, batch_size=len(batch))
        self.log("train/perplexity", plain.detach().exp(), batch_size=len(batch))
        if loss is not plain:
            self.log("train/weighted_loss", loss, batch_size=len(batch))
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=len(batch))
        return loss

    def validation_step(self, batch: SentenceBatch | TokenBatch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def on_test_epoch_start(self) -> None:
        context = self.evaluation.context_frames
        fit = self._layout.frames_that_fit(self.config.block_size) - 1  # context frames beside the target
        if context > fit:
            warn(
                f"model.evaluation.context_frames={context}: the context holds at most {fit} frames; studying 1..{fit}"
            )
            context = fit
        data = stage_data(self.trainer)
        index = data.sentence_index("test") if data is not None else None
        self._evaluation = TestEvaluation(self._layout, context, self.evaluation.next_frame_examples, index)

    def test_step(self, batch: SentenceBatch | TokenBatch, batch_idx: int) -> None:
        tokens, logits = self._eval_step(batch, batch_idx, "test")
        tokenizer = self._load_tokenizer() if self.tokenizer_path is not None else None
        self._evaluation.update(self.model, batch, tokens, logits, tokenizer)

    def _eval_step(self, batch: SentenceBatch | TokenBatch, batch_idx: int, split: str):
        tokens = self.token_batch(batch)
        loss, logits = self._loss(tokens)
        weight = int((tokens.labels != IGNORE_INDEX).sum())
        self.log(f"{split}/loss", loss, sync_dist=True, batch_size=max(weight, 1))
        if split == "val" and batch_idx == 0:
            self._preview = self._preview_rows(tokens, logits)
        return tokens, logits

    def on_validation_epoch_end(self) -> None:
        # perplexity of the token-weighted mean loss, not the mean of per-batch perplexities
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.log("val/perplexity", loss.exp())
        self._log_preview_grid()

    def predict_step(self, batch: PromptBatch, batch_idx: int):
        """Generate images for a prompt batch (see `lvm_pl.lvm.generation.predict_batch`)."""
        if self.tokenizer_path is None:
            raise UserError("model.tokenizer: prompting needs the VQGAN checkpoint to encode prompts and decode images")
        if not isinstance(batch, PromptBatch):
            raise UserError(
                f"data: prompting needs prompt data (datamodules.prompts.PromptDataModule), not {type(batch).__name__}"
            )
        self._check_image_size(batch.prompt.shape[-1])
        return predict_batch(self.model, self._load_tokenizer(), self.layout, batch, self.generation)

    def _check_image_size(self, side: int) -> None:
        """Images must give the tokens per image the LVM was trained on (a different data.image_size would not)."""
        tokens = (side // self._load_tokenizer().downsample_factor) ** 2
        if tokens != self._layout.tokens_per_image:
            raise UserError(
                f"data.image_size={side}: the tokenizer makes {tokens} tokens of such an image, but this LVM was"
                f" trained on {self._layout.tokens_per_image} tokens per image; set data.image_size to match"
            )

    def on_test_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("test/loss")
        if loss is not None:
            self.log("test/perplexity", loss.exp())  # of every token, teacher-forced; the evaluation's are per target
        for key, value in self._evaluation.finish(self.trainer).items():
            self.log(key, value, sync_dist=True)  # every rank computed the same value from the gathered records

    def _preview_rows(self, batch: TokenBatch, logits: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Teacher-forced preview: for the first whole sentence (>= 2 images) of each row, the argmax of the last
        image's tokens given the true context. Cheap; sampled generation lives in the generation code."""
        layout, tpi, rows, seen = self._layout, self._layout.tokens_per_image, [], set()
        data = stage_data(self.trainer)
        index = data.sentence_index("val") if data is not None else None
        for s in batch_sentences(batch, layout, index):
            if len(rows) >= self.evaluation.num_preview or s.row in seen or s.num_images < 2:
                continue
            seen.add(s.row)
            frames = sentence_frames(batch, s, layout)  # [N, tpi]
            start = s.start + layout.image_start(s.num_images - 1)  # the target's first token in the row
            predicted = logits[s.row, start - 1 : start - 1 + tpi, : layout.codebook_size].argmax(-1)  # [tpi]
            rows.append({"context": frames[:-1], "predicted": predicted, "truth": frames[-1]})
        return rows

    def _images(self, codes: torch.Tensor) -> list:
        """[n, tokens_per_image] codebook ids -> uint8 images: decoded by the tokenizer, else the ids as gray maps."""
        side = math.isqrt(self._layout.tokens_per_image)
        grids = codes.view(-1, side, side)
        if self.tokenizer_path is not None:
            with torch.no_grad():
                return list(image_utils.to_uint8(self._load_tokenizer().decode(grids)))
        gray = (grids.float() / (self._layout.codebook_size - 1) * 2 - 1)[:, None].expand(-1, 3, -1, -1)
        return list(image_utils.to_uint8(gray))

    def _log_preview_grid(self) -> None:
        rows, self._preview = self._preview, []
        if not rows or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        writer = tensorboard(self.loggers)
        if writer is None:
            return
        cells = [
            [*self._images(r["context"]), *self._images(r["predicted"][None]), *self._images(r["truth"][None])]
            for r in rows
        ]
        picture = image_utils.grid(cells)  # each row: context frames | prediction of the last | truth
        writer.add_image("val/context_prediction_truth", picture, self.global_step, dataformats="HWC")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # an LVM checkpoint always carries its token layout (configure_model stores it); others fail here, by name
        if "layout" not in checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY, {}):
            path = self._trainer.ckpt_path if self._trainer is not None else None
            raise UserError(f"ckpt_path={path}: not an LVM checkpoint (no token layout in its hyper-parameters)")

    def on_train_batch_start(self, batch: SentenceBatch | TokenBatch, batch_idx: int) -> None:
        # FLOPs per batch for ThroughputMonitor's MFU, measured once per batch shape on a meta-device twin
        shape = tuple(batch.input_ids.shape) if isinstance(batch, TokenBatch) else None
        if shape is not None and shape != self._flops_shape:
            with torch.device("meta"):
                twin = LLaMA(self.config)
                idx = torch.zeros(shape, dtype=torch.long)
                self.flops_per_batch = measure_flops(twin, lambda: twin(idx), lambda y: y.sum())
            self._flops_shape = shape

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # pre-clipping gradient norm; absent under ZeRO, whose gradients are partitioned (DeepSpeed logs its own)
        norms = grad_norm(self.model, norm_type=2)
        if "grad_2.0_norm_total" in norms:
            self.log("train/grad_norm", norms["grad_2.0_norm_total"])

    def configure_optimizers(self) -> dict:
        opt = self.optim
        decay, no_decay = [], []
        for module in self.model.modules():
            for name, p in module.named_parameters(recurse=False):
                excluded = isinstance(module, (RMSNorm, torch.nn.Embedding)) or name == "bias"
                (no_decay if opt.exclude_from_decay and excluded else decay).append(p)
        groups = [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = adamw(groups, self.trainer.strategy, lr=opt.lr, betas=tuple(opt.betas))
        total = opt.decay_steps or int(self.trainer.estimated_stepping_batches)
        schedule = warmup_cosine_schedule(optimizer, opt.warmup_steps, total, opt.min_lr / opt.lr)
        say(f"LVM {self.config.name}: {sum(p.numel() for p in self.model.parameters()):,} parameters, {total} steps")
        return {"optimizer": optimizer, "lr_scheduler": schedule}
