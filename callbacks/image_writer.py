"""Write the LVM's generated images: a PNG per generated frame and one grid per prompt, atomically.

Layout under `output_dir`: `<name>.png` is the prompt's grid, one row per candidate: prompt | generated | truth (when
known), sections separated by a blank cell, headed by column labels and captioned with the prompt's kind and source;
`<name>/c<candidate>_f<frame>.png` are the generated frames alone (and `<name>/tokens.json` their codebook ids, with
`tokens: true`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from lvm_pl import images as image_utils
from lvm_pl.atomic import save_image, write_json
from lvm_pl.batches import Generated
from lvm_pl.console import say
from lvm_pl.tensorboard import tensorboard


class ImageWriter(BasePredictionWriter):
    """Prediction writer for visual prompting: the LVM's `Generated` -> PNG files, optionally TensorBoard images.

    `frames`: also write each generated frame alone. `tensorboard`: add each grid to the TensorBoard logger.
    `labels`: head the grid's columns "prompt 1..k", "generated", "truth" and caption it with the prompt's kind and
    source (small frames enlarged so the text fits). `tokens`: also write the generated
    codebook ids as `<name>/tokens.json` ({"tokens": [candidate][frame][token]}). The progress bar shows generated
    tokens per second of generation time.
    """

    def __init__(
        self,
        output_dir: str = "generated",
        frames: bool = True,
        tensorboard: bool = False,
        labels: bool = True,
        tokens: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.frames, self.tensorboard, self.labels, self.tokens = frames, tensorboard, labels, tokens
        self.written = {"grids": 0, "frames": 0}
        self._tokens, self._seconds = 0, 0.0
        self._start = 0.0

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.written = {"grids": 0, "frames": 0}
        self._tokens, self._seconds = 0, 0.0
        self._start = time.perf_counter()

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Generated,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        prompts = prediction.prompts
        prompt = image_utils.to_uint8(prompts.prompt)  # [B, N, H, W, 3]
        generated = image_utils.to_uint8(prediction.images)  # [B, n, F, H, W, 3]
        truth = image_utils.to_uint8(prompts.truth)  # [B, M, H, W, 3]
        counts = {key: getattr(prompts, key).tolist() for key in ("num_prompt", "num_frames", "num_truth")}
        writer = tensorboard(trainer.loggers) if self.tensorboard else None
        for b, name in enumerate(prompts.names):
            n_prompt, n_frames, n_truth = counts["num_prompt"][b], counts["num_frames"][b], counts["num_truth"][b]
            rows = []
            for c in range(generated.shape[1]):
                row: list[np.ndarray | None] = [*prompt[b, :n_prompt], None, *generated[b, c, :n_frames]]
                if n_truth:
                    row += [None, *truth[b, :n_truth]]
                rows.append(row)
                if self.frames:
                    for f in range(n_frames):
                        save_image(self.output_dir / name / f"c{c}_f{f}.png", image_utils.to_pil(generated[b, c, f]))
                    self.written["frames"] += n_frames
            if self.tokens:
                ids = prediction.tokens[b, :, :n_frames].tolist()  # [n, F, tokens_per_image]
                write_json(self.output_dir / name / "tokens.json", {"tokens": ids})
            if self.labels:
                headers = {i: f"prompt {i + 1}" for i in range(n_prompt)} | {n_prompt + 1: "generated"}
                headers |= {n_prompt + n_frames + 2: "truth"} if n_truth else {}
                caption = f"{prompts.kinds[b]}: {prompts.sources[b] if prompts.sources else name}"
                picture = image_utils.labelled_grid(rows, headers, caption)
            else:
                picture = image_utils.grid(rows)
            save_image(self.output_dir / f"{name}.png", image_utils.to_pil(picture))
            self.written["grids"] += 1
            if writer is not None:
                writer.add_image(f"predict/{name}", picture, 0, dataformats="HWC")
        self._tokens += prediction.num_tokens
        self._seconds += prediction.seconds
        bar = getattr(trainer.progress_bar_callback, "predict_progress_bar", None)
        if bar is not None and self._seconds > 0:
            bar.set_postfix({"tokens/s": f"{self._tokens / self._seconds:.0f}"}, refresh=False)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rate = self._tokens / self._seconds if self._seconds > 0 else 0.0
        say(
            f"wrote {self.written['grids']} grids and {self.written['frames']} frames to {self.output_dir}"
            f" ({self._tokens} tokens at {rate:.0f} tokens/s; {time.perf_counter() - self._start:.1f} s in all)"
        )
