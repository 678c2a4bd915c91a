"""Token windows streamed from an S3 server against the same windows from local disk (tokens/s of train batches).

python bench/bench_stream.py [--quick] [--workers 0]

Writes synthetic paper-size shards (8192 codes, 256 tokens per image, 16-image sentences), converts them with
`stream-tokens` into litdata chunks on a moto S3 server this script starts on 127.0.0.1 (moto, a test dependency),
and times a train epoch of windows of 4096 (batch 8, shuffled) three ways: `TokenDataModule` on the local memmap
shards (the reference), `StreamingTokenDataModule` from S3 with an empty cache (every chunk downloaded: the figure),
and again with the cache warm. Results go to bench/results/bench_stream.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import write_results
from datamodules.stream_tokens import stream_tokens
from datamodules.streaming import StreamingTokenDataModule
from datamodules.tokens import TokenDataModule
from lvm_pl import shards
from lvm_pl.console import UserError, say
from lvm_pl.tokens import TokenLayout

SEQ_LEN, BATCH = 4096, 8


def epoch_tokens_per_s(dm) -> tuple[float, int]:
    """Tokens/s of one train epoch of `dm` (set up here), and its windows."""
    dm.setup("fit")
    loader = dm.train_dataloader()
    start, tokens, windows = time.perf_counter(), 0, 0
    for batch in loader:
        tokens += batch.input_ids.numel()
        windows += len(batch)
    return tokens / (time.perf_counter() - start), windows


def start_s3() -> tuple[str, object]:
    """moto's S3 server on a free port of 127.0.0.1, with a bucket; the AWS_* environment pointed at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    boto3.client("s3").create_bucket(Bucket="bench")
    return "s3://bench/tokens", server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small corpus (CI smoke run)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: in the main process)")
    parser.add_argument("--tokens", type=int, default=None, help="corpus tokens (default 2^22 quick, 2^26 full)")
    args = parser.parse_args()
    num_tokens = args.tokens or (1 << 22 if args.quick else 1 << 26)
    layout = TokenLayout.for_images(codebook_size=8192, image_size=256, downsample=16)
    count = max(1, num_tokens // layout.sentence_length(16))
    rng = np.random.default_rng(0)
    url, server = start_s3()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            images = [rng.integers(0, 8192, size=(16, layout.tokens_per_image)) for _ in range(count)]
            shards.write_split(Path(tmp) / "shards", "train", layout, images, shard_tokens=1 << 22)
            start = time.perf_counter()
            stream_tokens(str(Path(tmp) / "shards"), url, SEQ_LEN, chunk_bytes="16MB")
            convert_s = time.perf_counter() - start
            common = {"batch_size": BATCH, "num_workers": args.workers, "seed": 0}
            local, windows = epoch_tokens_per_s(
                TokenDataModule(train=str(Path(tmp) / "shards"), seq_len=SEQ_LEN, verify="size", **common)
            )
            cache = str(Path(tmp) / "cache")
            cold, streamed = epoch_tokens_per_s(StreamingTokenDataModule(train=url, cache_dir=cache, **common))
            warm, _ = epoch_tokens_per_s(StreamingTokenDataModule(train=url, cache_dir=cache, **common))
    finally:
        server.stop()
    say(f"local disk {local / 1e6:.1f} M tokens/s; S3 cold cache {cold / 1e6:.1f} M, warm {warm / 1e6:.1f} M")
    figures = [
        {
            "name": "stream windows tokens/s from S3 (cold cache)",
            "unit": "tokens/s",
            "ours": cold,
            "reference": local,
            "reference_name": "local memmap shards",
            "aim_ratio": 0.8,
        },
        {
            "name": "stream windows tokens/s from S3 (warm cache)",
            "unit": "tokens/s",
            "ours": warm,
            "reference": local,
            "reference_name": "local memmap shards",
            "aim_ratio": 0.8,
        },
    ]
    details = {
        "corpus_tokens": count * layout.sentence_length(16),
        "windows_local": windows,
        "windows_streamed": streamed,
        "seq_len": SEQ_LEN,
        "batch_size": BATCH,
        "workers": args.workers,
        "stream_tokens_seconds": convert_s,
        "local_tokens_per_s": local,
        "s3_cold_tokens_per_s": cold,
        "s3_warm_tokens_per_s": warm,
    }
    write_results("bench_stream", figures, details)


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
