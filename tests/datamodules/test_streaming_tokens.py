"""Token windows on object storage: `main.py stream-tokens` into moto's S3 server (tests/s3_server.py) and
`StreamingTokenDataModule` reading them back, weighted mixing, resume onto another number of ranks, storage faults."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, config, lvm_shape
from lightning.pytorch.callbacks import Callback
from s3_server import free_port

from datamodules.mix_plan import MixPlan
from datamodules.streaming import StreamingTokenDataModule
from datamodules.tokens import TokenDataModule
from lvm_pl import shards
from lvm_pl.tokens import TokenLayout

LAYOUT = TokenLayout(codebook_size=64, tokens_per_image=16, num_special=4)  # one-image sentence: 18 tokens
HERE = Path(__file__).resolve().parent


class SeenWindows(Callback):
    """Appends each trained batch's stream positions to `<directory>/seen-r<rank>.txt` (one line a batch)."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with open(self.directory / f"seen-r{trainer.global_rank}.txt", "a") as f:
            f.write(" ".join(str(p) for p in batch.positions.tolist()) + "\n")


def write_shards(path: Path, sentences: int, low: int = 0, high: int = 64, seed: int = 0) -> Path:
    """Shards of `sentences` one-image sentences with codebook ids in [low, high), as tokenizing writes them."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 3, size=sentences)
    images = [rng.integers(low, high, size=(int(n), LAYOUT.tokens_per_image)) for n in sizes]
    if sentences == 75:  # the resume test wants one-image sentences: 75 * 18 tokens = 84 windows of 16
        images = [i[:1] for i in images]
    shards.write_split(path, "train", LAYOUT, images, shard_tokens=400)
    return path


def main_py(cli, *args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python main.py args` with this folder and tests/ on PYTHONPATH, forked from the warm server `cli`."""
    path = os.pathsep.join([str(REPO), str(HERE), str(REPO / "tests")])
    return cli.run(list(args), cwd=cwd or os.getcwd(), env={**(env or os.environ), "PYTHONPATH": path})


def stream_tokens(cli, src: Path, out: str, seq_len: int, env: dict | None = None, *more: str) -> None:
    done = main_py(
        cli, "stream-tokens", "--input", str(src), "--output", out, "--seq_len", str(seq_len), *more, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_windows_from_s3_equal_windows_from_local_disk(tmp_path, s3_server, monkeypatch, warm_cli):
    src = write_shards(tmp_path / "shards", 40)
    url = s3_server.bucket("same") + "/tokens/train"
    stream_tokens(warm_cli, src, url, 16, s3_server.env(), "--chunk_bytes", "2KB")
    assert len(s3_server.fs().ls("same/tokens/train")) > 3  # several chunks: reads cross chunk boundaries
    for key, value in s3_server.env().items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    remote = StreamingTokenDataModule(train=url, cache_dir=str(tmp_path / "cache"), max_cache_size="1MB")
    remote.setup("fit")
    local = TokenDataModule(train=str(src), seq_len=16, verify="size")
    local.setup("fit")
    windows = local.datasets["train"]
    expected = {int(windows[i]["position"]): windows[i] for i in range(len(windows))}
    got = [b for b in remote.train_dataloader()]
    rows = {int(p): (b, r) for b in got for r, p in enumerate(b.positions.tolist())}
    assert len(rows) == sum(len(b) for b in got) == len(windows) // 2 * 2  # an odd last window waits (batch 2)
    assert any((b.labels == -100).any() for b in got) or len(windows) % 2  # the padded tail came through too
    for position, (batch, r) in rows.items():
        want = expected[position]
        assert torch.equal(batch.input_ids[r], want["input_ids"])
        assert torch.equal(batch.labels[r], want["labels"])
        assert torch.equal(batch.doc_ids[r], want["doc_ids"])


def test_weighted_mix_gives_the_asked_proportions(tmp_path, warm_cli):
    write_shards(tmp_path / "low", 300, 0, 32, seed=1)  # ids < 32: source "low"
    write_shards(tmp_path / "high", 300, 32, 64, seed=2)
    for name in ("low", "high"):
        stream_tokens(warm_cli, tmp_path / name, str(tmp_path / "stream" / name), 8, None, "--chunk_bytes", "4KB")
    weights = {str(tmp_path / "stream" / "low"): 0.8, str(tmp_path / "stream" / "high"): 0.2}
    dm = StreamingTokenDataModule(train=weights, batch_size=4, mix_block=100)
    dm.setup("fit")
    loader = dm.train_dataloader()
    seen = {"low": set(), "high": set()}
    draws = {"low": 0, "high": 0}
    for batch in loader:
        for row, position in zip(batch.input_ids, batch.positions.tolist(), strict=True):
            codes = row[row < LAYOUT.codebook_size]
            name = "low" if bool((codes < 32).all()) else "high"
            assert bool((codes >= 32).all()) or name == "low"  # a window holds one source's tokens
            seen[name].add(position)
            draws[name] += 1
    total = draws["low"] + draws["high"]
    assert abs(draws["low"] / total - 0.8) < 0.02 and abs(draws["high"] / total - 0.2) < 0.02
    assert len(seen["low"]) == draws["low"] and len(seen["high"]) == draws["high"]  # without replacement
    low_windows = dm.sources["train"][0].meta["num_windows"]
    assert draws["low"] >= low_windows - 4  # the source that runs out first is used up (less the last batch)


def test_mix_plan_is_a_permutation_independent_of_ranks():
    plan = MixPlan([[7, 9, 4], [5, 5]], [2.0, 1.0], seed=3, epoch=1, shuffle=True, block=6)
    keys = [plan[g] for g in range(len(plan))]
    assert len(set(keys)) == len(keys) == 30  # all 20 of source 0, 10 of source 1, none twice
    assert sorted(k for s, k in keys if s == 0) == list(range(20))
    other = MixPlan([[7, 9, 4], [5, 5]], [2.0, 1.0], seed=3, epoch=2, shuffle=True, block=6)
    assert [other[g] for g in range(30)] != keys  # each epoch its own order


@pytest.mark.slow
def test_training_resumed_onto_another_number_of_ranks_sees_each_window_once(tmp_path, s3_server, warm_cli):
    src = write_shards(tmp_path / "shards", 75)  # 1350 tokens: 84 windows of 16 (tail dropped)
    url = s3_server.bucket("resume") + "/train"
    env = s3_server.env(OMP_NUM_THREADS="1")
    stream_tokens(warm_cli, src, url, 16, env, "--tail", "drop", "--chunk_bytes", "1KB")
    (tmp_path / "seen").mkdir()
    common = [
        "fit",
        "-c",
        config("lvm/tiny.yaml"),
        "-c",
        config("data/tokens_stream.yaml"),
        f"--data.init_args.train={url}",
        "--data.init_args.val=null",
        "--data.init_args.seq_len=16",
        "--data.init_args.batch_size=2",
        "--data.init_args.num_workers=0",
        f"--data.init_args.cache_dir={tmp_path / 'cache'}",
        lvm_shape(block_size=16),
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.limit_val_batches=0",
        "--trainer.max_epochs=1",
        "--trainer.callbacks+=test_streaming_tokens.SeenWindows",
        f"--trainer.callbacks.directory={tmp_path / 'seen'}",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.every_n_train_steps=1",
    ]
    first = main_py(
        warm_cli,
        *common,
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_steps=3",
        env=env,
        cwd=tmp_path,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    ranks = [(tmp_path / "seen" / f"seen-r{r}.txt").read_text().split() for r in (0, 1)]
    assert [len(r) for r in ranks] == [6, 6]  # 3 steps of 2 windows on each of 2 ranks
    (tmp_path / "seen" / "seen-r0.txt").rename(tmp_path / "seen" / "first-r0.txt")
    last = f"--ckpt_path={tmp_path / 'ckpt' / 'last.ckpt'}"
    second = main_py(warm_cli, *common, "--trainer.devices=1", last, env=env, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    rest = (tmp_path / "seen" / "seen-r0.txt").read_text().split()
    seen = [int(p) for p in ranks[0] + ranks[1] + rest]
    assert sorted(seen) == [16 * w for w in range(84)]  # every window of the epoch once, none twice


def test_storage_faults_are_one_line_naming_the_url(tmp_path, s3_server, s3_server_checking_credentials, warm_cli):
    src = write_shards(tmp_path / "shards", 20)
    bucket = s3_server.bucket("faults")
    strict = s3_server_checking_credentials
    strict.bucket("strict")
    denied = strict.env(AWS_ACCESS_KEY_ID="bad", AWS_SECRET_ACCESS_KEY="wrong")
    cases = {
        "missing bucket": ("s3://no-such-bucket-here/tokens", s3_server.env()),
        "bad credentials": ("s3://strict/denied", denied),
        "unreachable endpoint": (f"{bucket}/away", s3_server.env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")),
    }
    commands = [
        {
            "argv": ["stream-tokens", "--input", str(src), "--output", url, "--seq_len", "16"],
            "cwd": str(tmp_path),
            "env": env,
        }
        for url, env in cases.values()
    ]
    never = f"{bucket}/never-written"
    fit = ["fit", "-c", config("lvm/tiny.yaml"), "-c", config("data/tokens_stream.yaml")]
    fit += [f"--data.init_args.train={never}", "--data.init_args.val=null"]
    commands.append({"argv": fit, "cwd": str(tmp_path), "env": s3_server.env()})
    done = [warm_cli.run(c["argv"], cwd=c["cwd"], env=c["env"]) for c in commands]
    for (name, (url, _)), result in zip(list(cases.items()) + [("missing", (never, None))], done, strict=True):
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert result.returncode == 2 and len(errors) == 1 and url in errors[0], (name, result.stderr[-2000:])
        if name != "missing":
            assert result.stderr.strip() == errors[0], (name, result.stderr[-2000:])  # nothing but the line
    assert s3_server.fs().ls("faults") == []  # nothing partial left
    assert strict.fs().ls("strict") == []
