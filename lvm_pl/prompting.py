"""`prompt`: visual prompting from image files in one command (an LVM checkpoint, a VQGAN checkpoint, images).

    python main.py prompt --lvm LVM.ckpt --tokenizer VQGAN.ckpt --images a.png b.png c.png --out out/
    python main.py prompt ... --images A.png A2.png B.png      # an analogy: A -> A2 as B -> ?
    python main.py prompt ... --images frames/ --num_frames 4  # a folder: its images in natural order

Runs the `predict` path (PromptDataset -> LVM.predict_step -> ImageWriter) on one prompt; writes
`out/prompt.png` (labelled grid: prompt | generated), `out/prompt/c<candidate>_f<frame>.png` and the generated
codebook ids `out/prompt/tokens.json`.
"""

from __future__ import annotations

import math
from pathlib import Path

from datamodules.imageio import IMAGE_EXTENSIONS, BadImage, check_image
from datamodules.prompts import Prompt, PromptDataset, collate_prompts
from datamodules.sources.folder_index import natural_key
from lvm_pl.console import UserError, say, warn
from lvm_pl.lvm.generation import GenerationSettings, window_frames
from lvm_pl.quiet import ignoring


def _image_paths(images: list[str]) -> list[str]:
    """The prompt's files: the given ones, or a single folder's images in natural order; each must decode."""
    if len(images) == 1 and Path(images[0]).is_dir():
        folder = Path(images[0])
        images = [str(p) for p in sorted(folder.iterdir(), key=natural_key) if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not images:
            raise UserError(f"images={folder}: a folder without images ({', '.join(IMAGE_EXTENSIONS)})")
    if not images:
        raise UserError("images: give at least one image file (or one folder)")
    for path in images:
        if not Path(path).is_file():
            raise UserError(f"images: {path} does not exist")
        try:
            check_image(path)
        except BadImage as err:
            raise UserError(f"images: cannot read {err}") from None
    return images


def _source(paths: list[str]) -> str:
    """A caption's words for the prompt's files: their folder and names."""
    folders = {str(Path(p).parent) for p in paths}
    names = " ".join(Path(p).name for p in paths)
    return f"{folders.pop()}/ {names}" if len(folders) == 1 else names


def prompt(
    lvm: str,
    tokenizer: str,
    images: list[str],
    out: str = "prompted",
    num_frames: int = 1,
    generation: GenerationSettings | None = None,
    precision: str = "32-true",
    accelerator: str = "auto",
) -> None:
    """Continue the sequence `images` (files, or one folder) by `num_frames` frames with the LVM checkpoint `lvm`
    (e.g. from `import-hf`) and the VQGAN checkpoint `tokenizer` (e.g. from `import-vqgan`).

    Images are resized and centre-cropped to the tokenizer's input size; a prompt longer than the context keeps its
    latest frames.

    Args:
        lvm: the LVM checkpoint (from `main.py fit`, `import-hf` or `convert-zero`).
        tokenizer: the VQGAN checkpoint the LVM was trained with (from `main.py fit` or `import-vqgan`).
        images: the prompt's image files in order, or one folder (its images in natural order).
        out: the output directory: `<out>/prompt.png` (the labelled grid) and `<out>/prompt/` (frames, token ids).
        num_frames: frames to generate after the prompt.
        generation: the sampling settings of configs/generate.yaml (`--generation.temperature 0` is greedy).
        precision: the Trainer's precision (`bf16-true` halves the memory of a released 7B model).
        accelerator: the Trainer's accelerator: auto, cpu, gpu.
    """
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from callbacks.image_writer import ImageWriter
    from lvm_pl.lvm.module import LVM
    from lvm_pl.vqgan import load_tokenizer

    if num_frames < 1:
        raise UserError(f"num_frames={num_frames}: must be >= 1")
    paths = _image_paths(images)
    vq = load_tokenizer(tokenizer)
    if not Path(lvm).is_file():
        raise UserError(f"lvm={lvm}: no such file")
    settings = generation or GenerationSettings()
    module = LVM.load_from_checkpoint(lvm, map_location="cpu", tokenizer=tokenizer, generation=settings)
    layout = module.layout
    side = math.isqrt(layout.tokens_per_image)
    if side * side != layout.tokens_per_image:
        raise UserError(f"lvm={lvm}: {layout.tokens_per_image} tokens per image is not a square grid")
    size = side * vq.downsample_factor
    window = window_frames(layout, module.config.block_size, settings.max_context_frames)
    if len(paths) > window:
        warn(f"prompt: {len(paths)} images, the context holds {window}: the earliest {len(paths) - window} dropped")
        paths = paths[-window:]
    from PIL import Image

    resized = sum(Image.open(p).size != (size, size) for p in paths)
    if resized:
        say(f"prompt: {resized} of {len(paths)} images resized and centre-cropped to {size}x{size} (the tokenizer's)")
    loader = DataLoader(
        PromptDataset([Prompt("prompt", "sequence", paths, num_frames, source=_source(paths))], size),
        batch_size=1,
        collate_fn=collate_prompts,
    )
    trainer = Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=True,  # a released 7B model takes minutes: the bar shows the frames and tokens/s
        enable_model_summary=False,
        callbacks=[ImageWriter(out, frames=True, tokens=True)],
    )
    # one prompt: the time is generation's, a loader worker would not shorten it (Lightning advises some)
    with ignoring((r"The 'predict_dataloader' does not have many workers", r"lightning\.pytorch\.trainer\.connectors")):
        trainer.predict(module, loader, return_predictions=False)
