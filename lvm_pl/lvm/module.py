"""The LVM LightningModule: next-token cross-entropy over packed visual-sentence windows with a LLaMA decoder.

The vocabulary is never configured independently of the tokenizer: the token layout comes from the datamodule's
`layout` (token shards), from the tokenizer checkpoint (on-the-fly mode), or from the checkpoint being loaded, and is
stored in the hyper-parameters so `LVM.load_from_checkpoint(path)` rebuilds the model without data.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import grad_norm

from lvm_pl import images as image_utils
from lvm_pl.console import UserError, say, warn
from lvm_pl.finite import NonFinitePolicy, check_finite
from lvm_pl.lvm.config import LVMConfig
from lvm_pl.lvm.evaluation import TestEvaluation, shard_locator
from lvm_pl.lvm.generation import GenerationSettings, predict_batch
from lvm_pl.lvm.model import LLaMA, RMSNorm
from lvm_pl.tokens import TokenLayout

IGNORE_INDEX = -100


def batch_size(batch: dict) -> int:
    """Sequences in a batch (for `ThroughputMonitor(batch_size_fn=...)`)."""
    return len(batch["input_ids"] if "input_ids" in batch else batch["images"])


def batch_tokens(batch: dict) -> int:
    """Tokens in a batch (for `ThroughputMonitor(length_fn=...)`, so its items/s are tokens/s); sentence batches,
    tokenized inside the step, count one per sentence."""
    return batch["input_ids"].numel() if "input_ids" in batch else batch_size(batch)


class LVM(LightningModule):
    """LLaMA decoder trained on visual sentences. `model` names a preset of `LVMConfig`, `model_overrides` change it.

    `init_from`: a checkpoint (e.g. from `import-hf`) whose weights and token layout start this run (weights only:
    optimizer, schedule and loops start fresh; use `--ckpt_path` to resume a run instead).

    Optimizer: AdamW, optionally without weight decay on norms, embeddings and biases; schedule: linear warmup to
    `lr`, cosine to `min_lr` at `decay_steps` (default: the Trainer's total steps), then flat at `min_lr`.

    `test` (lvm_pl/lvm/evaluation.py): target-image perplexity by sentence kind, the context-length study over
    `context_frames` frames (0: off) and greedy next-frame quality on up to `next_frame_examples` sentences (0: off).
    Both are run settings, not model properties: checkpoints leave them out, so the test config decides.

    `non_finite`: a NaN/Inf training loss stops the run naming the step (`stop`; the last checkpoint stays the last
    good one) or skips that step's update (`skip`).
    """

    def __init__(
        self,
        model: str = "tiny",
        model_overrides: dict[str, Any] | None = None,
        vocab_size: int | None = None,
        layout: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        init_from: str | None = None,
        activation_checkpointing: bool = False,
        compile: bool = False,
        lr: float = 1e-3,
        min_lr: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        exclude_from_decay: bool = True,
        warmup_steps: int = 0,
        decay_steps: int | None = None,
        num_preview: int = 4,
        context_frames: int = 0,
        next_frame_examples: int = 0,
        non_finite: NonFinitePolicy = "stop",
        generation: GenerationSettings | None = None,
    ) -> None:
        super().__init__()
        # run-time inputs stay out of the checkpoint, so `--ckpt_path` never overrides the ones a command gives
        self.save_hyperparameters(ignore=["tokenizer", "context_frames", "next_frame_examples", "generation"])
        self.tokenizer_path = tokenizer
        self.generation = generation or GenerationSettings()
        self.context_frames, self.next_frame_examples = context_frames, next_frame_examples
        self._evaluation: TestEvaluation | None = None
        self.config = LVMConfig.from_name(model, **(model_overrides or {}))
        self.model: LLaMA | None = None
        self.tokenizer: torch.nn.Module | None = None
        self._layout = TokenLayout.from_dict(layout) if layout is not None else None
        self._preview: list[dict[str, torch.Tensor]] = []
        self._flops_shape: tuple[int, int] | None = None
        self.flops_per_batch: int | None = None  # ThroughputMonitor reads it; set per token-batch shape

    @property
    def layout(self) -> TokenLayout | None:
        """The token layout the vocabulary is built for (None until resolved from data, tokenizer or checkpoint)."""
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
        """The layout from checkpoint hparams, the datamodule, or the tokenizer; checked against `vocab_size`."""
        layout = self._layout
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if layout is None and self.hparams.init_from is not None:
            saved = self._init_checkpoint()[self.CHECKPOINT_HYPER_PARAMS_KEY].get("layout")
            layout = TokenLayout.from_dict(saved) if saved is not None else None
        if layout is None and isinstance(getattr(datamodule, "layout", None), TokenLayout):
            layout = datamodule.layout
        if layout is None and self.tokenizer_path is not None:
            tokenizer = self._load_tokenizer()
            image_size = getattr(datamodule, "image_size", None)
            if image_size is None:
                raise UserError("model.tokenizer: on-the-fly tokenizing needs a datamodule with `image_size`")
            layout = TokenLayout.for_images(tokenizer.codebook_size, image_size, tokenizer.downsample_factor)
        if layout is None:
            raise UserError(
                "model: no token layout: use token shards (datamodules.tokens.TokenDataModule), set model.tokenizer,"
                " or load a checkpoint"
            )
        if self.hparams.vocab_size is not None:
            layout.check_compatible(self.hparams.vocab_size, f"model.vocab_size={self.hparams.vocab_size}")
        return layout

    def configure_model(self) -> None:
        """Build the decoder once the layout is known (inside the strategy's init context: sharded under ZeRO-3)."""
        if self.model is not None:
            return
        self._layout = self._resolve_layout()
        self.hparams["layout"] = self._layout.to_dict()  # checkpoints rebuild without data
        self.config = LVMConfig.from_name(
            self.hparams.model, **{**(self.hparams.model_overrides or {}), "vocab_size": self._layout.vocab_size}
        )
        self.model = LLaMA(self.config)
        self.model.activation_checkpointing = self.hparams.activation_checkpointing
        if self.hparams.init_from is not None:
            self._load_init_weights()
        if self.hparams.compile:
            for block in self.model.layers:
                block.compile()  # in place: parameter names (and checkpoints) stay those of the eager model

    def _init_checkpoint(self) -> dict:
        path = self.hparams.init_from
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except FileNotFoundError:
            raise UserError(f"model.init_from={path}: no such file") from None

    def _load_init_weights(self) -> None:
        state = self._init_checkpoint()["state_dict"]
        weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        try:
            self.model.load_state_dict(weights)
        except RuntimeError as err:
            raise UserError(
                f"model.init_from={self.hparams.init_from}: weights do not fit model={self.hparams.model!r}"
                f" with model_overrides={self.hparams.model_overrides} ({str(err).splitlines()[1].strip()})"
            ) from None
        say(f"initialised the LVM from {self.hparams.init_from}")
        # the weights are this run's from now on: its checkpoints must not need (or re-read) the source file
        self.hparams["init_from"] = None

    def forward(self, idx: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] for token ids [B, T]."""
        return self.model(idx, doc_ids=doc_ids)

    def token_batch(self, batch: dict) -> dict[str, torch.Tensor]:
        """A token batch as is; a sentence batch {"images", "num_images"} tokenized into `[BOS] img.. [EOS]` rows."""
        if "input_ids" in batch:
            return batch
        images, counts = batch["images"], batch["num_images"]  # [B, N, 3, H, W], [B]
        self._check_image_size(images.shape[-1])
        B, N = images.shape[:2]
        with torch.no_grad():
            codes = self._load_tokenizer().encode(images.flatten(0, 1)).view(B, N, -1)  # [B, N, h*w]
        # a sentence longer than the context keeps its most recent whole frames (the paper's sliding window)
        fit = (self.config.block_size + 1 - self._layout.sentence_length(0)) // self._layout.tokens_per_image
        sentences = [self._layout.sentence(codes[b, max(0, int(counts[b]) - fit) : int(counts[b])]) for b in range(B)]
        length = max(len(s) for s in sentences) - 1
        input_ids = torch.full((B, length), self._layout.eos_id, dtype=torch.long, device=images.device)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for b, s in enumerate(sentences):
            input_ids[b, : len(s) - 1], labels[b, : len(s) - 1] = s[:-1], s[1:]
        return {"input_ids": input_ids, "labels": labels, "doc_ids": torch.zeros_like(input_ids)}

    def _loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(batch["input_ids"], doc_ids=batch.get("doc_ids"))  # [B, T, V]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
        return loss, logits

    def on_fit_start(self) -> None:
        seq_len = getattr(self.trainer.datamodule, "seq_len", None)
        if isinstance(seq_len, int) and seq_len < self.config.block_size:
            warn(
                f"data.seq_len={seq_len} is shorter than the model's block_size={self.config.block_size}: positions"
                " past the training window are never trained, yet test and predict fill the whole block_size;"
                f" set model.model_overrides.block_size to {seq_len}"
            )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        batch = self.token_batch(batch)
        loss, _ = self._loss(batch)
        if not check_finite({"train/loss": loss}, self.global_step, self.hparams.non_finite):
            return None  # Lightning skips backward and the optimizer step for this batch
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/perplexity", loss.detach().exp())
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def on_test_epoch_start(self) -> None:
        locate = shard_locator(self.trainer)
        context = self.context_frames
        fit = self.config.block_size // self._layout.tokens_per_image - 1  # [BOS] + k context frames + the target
        if context > fit:
            warn(f"model.context_frames={context}: the context holds at most {fit} frames; studying 1..{fit}")
            context = fit
        self._evaluation = TestEvaluation(self._layout, context, self.next_frame_examples, locate)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        tokens, logits = self._eval_step(batch, batch_idx, "test")
        tokenizer = self._load_tokenizer() if self.tokenizer_path is not None else None
        self._evaluation.update(self.model, batch, tokens, logits, batch_idx, tokenizer)

    def _eval_step(self, batch: dict, batch_idx: int, split: str) -> tuple[dict, torch.Tensor]:
        batch = self.token_batch(batch)
        loss, logits = self._loss(batch)
        weight = int((batch["labels"] != IGNORE_INDEX).sum())
        self.log(f"{split}/loss", loss, sync_dist=True, batch_size=max(weight, 1))
        if split == "val" and batch_idx == 0:
            self._preview = self._preview_rows(batch, logits)
        return batch, logits

    def on_validation_epoch_end(self) -> None:
        # perplexity of the token-weighted mean loss, not the mean of per-batch perplexities
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.log("val/perplexity", loss.exp())
        self._log_preview_grid()

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Generate images for a PromptDataModule batch (see `lvm_pl.lvm.generation.predict_batch`)."""
        if self.tokenizer_path is None:
            raise UserError("model.tokenizer: prompting needs the VQGAN checkpoint to encode prompts and decode images")
        self._check_image_size(batch["prompt"].shape[-1])
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

    def _preview_rows(self, batch: dict, logits: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Teacher-forced preview: for the first whole sentence of each window (>= 2 images), the argmax of the
        last image's tokens given the true context. Cheap; sampled generation lives in the generation code."""
        layout, rows = self._layout, []
        tpi = layout.tokens_per_image
        for b in range(batch["input_ids"].shape[0]):
            if len(rows) >= self.hparams.num_preview:
                break
            ids, labels, docs = batch["input_ids"][b], batch["labels"][b], batch["doc_ids"][b]
            # the window's full token stream: inputs plus the one label past the last input
            stream = torch.cat([ids, labels[-1:].clamp(min=0)])
            first = stream[: int((docs == docs[0]).sum()) + 1]
            if first[0] != layout.bos_id or layout.eos_id not in first[1:].tolist():
                continue
            end = 1 + first[1:].tolist().index(layout.eos_id)
            n = (end - 1) // tpi
            if n < 2 or (end - 1) % tpi:
                continue
            start = layout.image_start(n - 1)
            predicted = logits[b, start - 1 : start - 1 + tpi, : layout.codebook_size].argmax(-1)  # [tpi]
            rows.append(
                {
                    "context": layout.images(first[: end + 1])[:-1],
                    "predicted": predicted,
                    "truth": stream[start : start + tpi],
                }
            )
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
        logger = next((lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is None:
            return
        cells = [
            [*self._images(r["context"]), *self._images(r["predicted"][None]), *self._images(r["truth"][None])]
            for r in rows
        ]
        picture = image_utils.grid(cells)  # each row: context frames | prediction of the last | truth
        logger.experiment.add_image("val/context_prediction_truth", picture, self.global_step, dataformats="HWC")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # an LVM checkpoint always carries its token layout (configure_model stores it); others fail here, by name
        if "layout" not in checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY, {}):
            path = self._trainer.ckpt_path if self._trainer is not None else None
            raise UserError(f"ckpt_path={path}: not an LVM checkpoint (no token layout in its hyper-parameters)")

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        # FLOPs per batch for ThroughputMonitor's MFU, measured once per batch shape on a meta-device twin
        shape = tuple(batch["input_ids"].shape) if "input_ids" in batch else None
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
        hp = self.hparams
        decay, no_decay = [], []
        for module in self.model.modules():
            for name, p in module.named_parameters(recurse=False):
                excluded = isinstance(module, (RMSNorm, torch.nn.Embedding)) or name == "bias"
                (no_decay if hp.exclude_from_decay and excluded else decay).append(p)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr, betas=tuple(hp.betas))
        total = hp.decay_steps or int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, hp.warmup_steps, total, hp.min_lr / hp.lr)
        )
        say(f"LVM {self.config.name}: {sum(p.numel() for p in self.model.parameters()):,} parameters, {total} steps")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def warmup_cosine(step: int, warmup: int, total: int, floor: float) -> float:
    """lr multiplier: linear 0 -> 1 over `warmup` steps, cosine 1 -> `floor` until `total`, then `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
