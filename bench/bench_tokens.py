"""Token pipeline speed: packed-loader tokens/s, and tokenize images/s against the tokenizer's bare `encode`.

python bench/bench_tokens.py [--quick] [--workers 0] [--vqgan CKPT | --vqgan-config YAML] [--device cuda]

The loader part writes synthetic paper-size shards (8192 codes, 256 tokens per image, 16-image sentences) to a temp
dir and times `TokenDataModule`'s train loader (windows of 4096, shuffled) over whole epochs. The tokenize part times
`encode` on random images, then the full predict pipeline (data, model, token writer) on the same kind of images, and
reports the overhead. Its VQGAN is `--vqgan` (a checkpoint), or else a checkpoint written from `--vqgan-config` with
seeded random weights (speed does not depend on the values; default the tiny config, so CPU runs take seconds).
Results go to bench/results/bench_tokens.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule, Trainer
from torch.utils.data import DataLoader

from bench.common import ROOT, vqgan_from_config, write_results
from callbacks.token_writer import TokenWriter
from datamodules.sentences import collate_sentences
from datamodules.sources.base import range_units
from datamodules.tokens import TokenDataModule
from datamodules.units import UnitSentences, unit_loader
from lvm_pl import shards
from lvm_pl.console import UserError, say
from lvm_pl.safe_load import weights_only_loads
from lvm_pl.stage_data import StageData
from lvm_pl.tokens import TokenLayout


def bench_loader(num_tokens: int, workers: int, seq_len: int = 4096, batch_size: int = 8, min_seconds: float = 3.0):
    """Tokens/s of packed train batches (input_ids + labels + doc_ids) from memmapped shards."""
    layout = TokenLayout.for_images(codebook_size=8192, image_size=256, downsample=16)
    sentence_images = 16
    count = max(1, num_tokens // layout.sentence_length(sentence_images))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        images = [rng.integers(0, 8192, size=(sentence_images, layout.tokens_per_image)) for _ in range(count)]
        shards.write_split(tmp, "train", layout, images, shard_tokens=1 << 22)
        dm = TokenDataModule(train=tmp, seq_len=seq_len, batch_size=batch_size, num_workers=workers, verify="size")
        dm.setup("fit")
        loader = dm.train_dataloader()
        tokens, start, epochs = 0, time.perf_counter(), 0
        while time.perf_counter() - start < min_seconds or epochs == 0:
            loader.sampler.set_epoch(epochs)
            for batch in loader:
                tokens += batch.input_ids.numel()
            epochs += 1
        seconds = time.perf_counter() - start
    return {
        "tokens_per_s": tokens / seconds,
        "stream_tokens": count * layout.sentence_length(sentence_images),
        "epochs": epochs,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "workers": workers,
    }


class RandomSentences(torch.utils.data.Dataset):
    """One-image sentences of seeded random pixels: the pipeline's data cost without decoding files."""

    def __init__(self, count: int, size: int) -> None:
        self.count, self.size = count, size

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        images = torch.rand(1, 3, self.size, self.size, generator=g) * 2 - 1  # [N=1, 3, H, W]
        return {"images": images, "kind": "single", "index": i}


class RandomSentenceData(LightningDataModule, StageData):
    """`UnitBatch`es of `RandomSentences`, as `VisualSentenceDataModule(unit="sentence")` yields them to tokenize."""

    layout, seq_len, predict_split = None, None, "train"

    def __init__(self, count: int, size: int, batch_size: int) -> None:
        super().__init__()
        self.count, self.image_size, self.batch_size = count, size, batch_size
        self.units: tuple | None = None

    def work_units(self, split: str, sentences_per_unit: int) -> list:
        return range_units(split, self.count, sentences_per_unit)

    def predict_units(self, units: list, claims) -> None:
        self.units = (units, claims)

    def unit_items(self, unit) -> Iterator[dict]:
        dataset = RandomSentences(self.count, self.image_size)
        return (dataset[i] for i in range(unit.start, unit.stop))

    def predict_dataloader(self) -> DataLoader:
        workers = 4 if torch.cuda.is_available() else 1  # on CPU, workers compete with encode for the same cores
        units, claims = self.units
        dataset = UnitSentences(units, claims, self.unit_items, self.batch_size, collate_sentences, self.image_size)
        return unit_loader(dataset, workers)


def bench_tokenize(checkpoint: str, device: str, count: int, batch_size: int, size: int = 256) -> dict:
    """Images/s of bare `encode` vs the whole predict pipeline with the token writer, on the same kind of images."""
    from lvm_pl.vqgan import load_tokenizer

    model = load_tokenizer(checkpoint).to(device)
    images = torch.rand(batch_size, 3, size, size, device=device) * 2 - 1
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    steps = max(1, count // batch_size)
    with torch.inference_mode():
        model.encode(images)  # warm-up: kernels, allocator
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            model.encode(images)
        sync()
    encode_ips = steps * batch_size / (time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as tmp:
        writer = TokenWriter(tmp, sentences_per_unit=4 * batch_size, lease_s=600, split="train")
        trainer = Trainer(
            accelerator="gpu" if device.startswith("cuda") else "cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[writer],
        )
        data = RandomSentenceData(steps * batch_size, size, batch_size)
        trainer.predict(model, data, ckpt_path=checkpoint, return_predictions=False)  # as tokenize.yaml runs it
        pipeline_ips = writer.images_per_s  # since predict started: Trainer setup and checkpoint restore excluded
    return {
        "encode_images_per_s": encode_ips,
        "pipeline_images_per_s": pipeline_ips,
        "overhead": 1 - pipeline_ips / encode_ips,
        "images": steps * batch_size,
        "batch_size": batch_size,
        "image_size": size,
        "device": device,
    }


def random_checkpoint(config: Path, directory: str) -> str:
    """A `main.py fit`-style checkpoint of the VQGAN in `config` with seeded random weights; returns its path."""
    built = vqgan_from_config(config)
    built.trainer.strategy.connect(built.model)
    path = str(Path(directory) / "vqgan.ckpt")
    built.trainer.save_checkpoint(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small stream, short timing (CI smoke run)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: in the main process)")
    parser.add_argument("--vqgan", default=None, help="VQGAN checkpoint for the tokenize benchmark")
    parser.add_argument(
        "--vqgan-config",
        default="configs/vqgan/tiny.yaml",
        help="without --vqgan: the VQGAN YAML whose random-weight model the tokenize benchmark runs",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=256, help="tokenize benchmark image side (pixels)")
    parser.add_argument("--images", type=int, default=None, help="tokenize benchmark images (64 quick, 2048 full)")
    args = parser.parse_args()
    if args.vqgan:
        from lvm_pl.vqgan import load_tokenizer

        load_tokenizer(args.vqgan)  # a bad file fails here, not after minutes of timing
    results = {
        "loader": bench_loader(
            num_tokens=1 << 21 if args.quick else 1 << 26, workers=args.workers, min_seconds=1 if args.quick else 5
        )
    }
    say(f"packed loader: {results['loader']['tokens_per_s'] / 1e6:.1f} M tokens/s ({args.workers} workers)")
    # rows of `python -m bench`'s table (schema: bench/common.py figure())
    figures = [
        {
            "name": "packed loader tokens/s",
            "unit": "tokens/s",
            "ours": results["loader"]["tokens_per_s"],
            "aim_min": 5e6,
        }
    ]
    count = args.images or (64 if args.quick else 2048)
    size = 32 if args.quick else args.image_size
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.vqgan or random_checkpoint(ROOT / args.vqgan_config, tmp)
        results["tokenize"] = bench_tokenize(checkpoint, args.device, count=count, batch_size=32, size=size)
    results["tokenize"]["vqgan"] = args.vqgan or f"{args.vqgan_config} (random weights)"
    t = results["tokenize"]
    say(
        f"tokenize: encode {t['encode_images_per_s']:.1f} images/s, pipeline {t['pipeline_images_per_s']:.1f}"
        f" images/s (overhead {t['overhead']:.1%})"
    )
    figures.append(
        {
            "name": f"tokenize pipeline images/s ({size} px)",
            "unit": "images/s",
            "ours": t["pipeline_images_per_s"],
            "reference": t["encode_images_per_s"],
            "reference_name": "bare encode",
            "aim_ratio": 0.9,
        }
    )
    write_results("bench_tokens", figures, results)


if __name__ == "__main__":
    try:
        with weights_only_loads():  # the predict pipeline's checkpoint read included
            main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
