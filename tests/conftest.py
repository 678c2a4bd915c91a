"""Test defaults: CPU only, few threads, temporary run directories, and the `gpu`/`slow` markers."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # tests run on CPU even where a GPU exists, except `gpu` ones
os.environ.setdefault("PL_DISABLE_FORK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# where `make install` built DeepSpeed's CPU Adam op (the Makefile's TORCH_EXTENSIONS_DIR), also for a bare `pytest`:
# elsewhere the offload tests would wait minutes for the compiler
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

import torch  # noqa: E402

# under pytest-xdist each worker gets its share of the cores (2 workers on 2 cores: one thread each)
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _workers))


def pytest_collection_modifyitems(config, items):
    _heavy_files_first(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _heavy_files_first(items: list) -> None:
    """Files with the most `slow` tests run first (a stable sort: the order inside a file is kept). pytest-xdist hands
    out whole files (`--dist loadfile`) in this order, so the long ones start early and the short ones fill the gaps,
    instead of one long file running alone at the end."""
    slow: dict[str, int] = {}
    for item in items:
        slow[str(item.path)] = slow.get(str(item.path), 0) + ("slow" in item.keywords)
    items.sort(key=lambda item: -slow[str(item.path)])


@pytest.fixture(autouse=True)
def _in_tmp_cwd(tmp_path, monkeypatch):
    """Each test runs in its own temporary working directory, so `runs/` and outputs never touch the repo."""
    monkeypatch.chdir(tmp_path)
    yield


@pytest.fixture(scope="session")
def repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory, repo_root) -> dict:
    """Tiny inputs any config can run on, made once per session through the real CLI:
    an image folder, a video, a VQGAN checkpoint, token shards (train/val, and as stream-tokens outputs), an LVM
    checkpoint and the image folder as tar shards (`make-shards --layout image`)."""
    import av
    import numpy as np
    from PIL import Image

    from main import cli

    root = tmp_path_factory.mktemp("assets")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        rng = np.random.default_rng(0)
        for s in range(4):
            for i in range(3):
                path = root / "folder" / f"sentence{s}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        (root / "videos").mkdir()
        with av.open(str(root / "videos" / "clip.mp4"), "w") as out:
            stream = out.add_stream("mpeg4", rate=8)
            stream.width = stream.height = 32
            stream.pix_fmt = "yuv420p"
            for t in range(12):
                frame = np.full((32, 32, 3), 20 * t, dtype=np.uint8)
                out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            out.mux(stream.encode(None))

        cfg = lambda name: str(repo_root / "configs" / name)  # noqa: E731
        small = [
            "--data.init_args.image_size=32",
            "--data.init_args.num_workers=0",
            "--data.init_args.batch_size=4",
            "--data.init_args.source.init_args.splits={train: 8, val: 4, test: 4}",
        ]
        quiet = [
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.callbacks=[]",
        ]
        run = cli(
            [
                "fit",
                "-c",
                cfg("vqgan/tiny.yaml"),
                "-c",
                cfg("data/builtin.yaml"),
                *small,
                *quiet,
                "--trainer.max_steps=2",
                "--trainer.max_time=null",
                "--trainer.limit_val_batches=0",
            ]
        )
        vqgan_ckpt = root / "vqgan.ckpt"
        run.trainer.save_checkpoint(vqgan_ckpt)
        for split in ("train", "val"):
            cli(
                [
                    "predict",
                    "-c",
                    cfg("vqgan/tiny.yaml"),
                    "-c",
                    cfg("data/builtin.yaml"),
                    "-c",
                    cfg("tokenize.yaml"),
                    *small,
                    "--data.init_args.max_images=4",
                    f"--ckpt_path={vqgan_ckpt}",
                    f"--data.init_args.predict_split={split}",
                    f"--trainer.callbacks.init_args.split={split}",
                    f"--trainer.callbacks.init_args.output_dir={root / 'shards' / split}",
                ]
            )
        from datamodules.stream_tokens import stream_tokens

        for split, windows in (("train", "stream"), ("val", "sentence")):  # configs/data/tokens_stream.yaml's data
            stream_tokens(str(root / "shards" / split), str(root / "stream" / split), 64, windows=windows)
        run = cli(
            [
                "fit",
                "-c",
                cfg("lvm/tiny.yaml"),
                "-c",
                cfg("data/tokens.yaml"),
                *quiet,
                f"--data.init_args.train={root / 'shards' / 'train'}",
                f"--data.init_args.val={root / 'shards' / 'val'}",
                "--data.init_args.seq_len=64",
                "--data.init_args.batch_size=2",
                "--data.init_args.num_workers=0",
                "--trainer.max_steps=2",
                "--trainer.limit_val_batches=0",
                "--trainer.callbacks=[]",
            ]
        )
        lvm_ckpt = root / "lvm.ckpt"
        run.trainer.save_checkpoint(lvm_ckpt)
        from datamodules.make_shards import make_shards

        folder = [f"--data.init_args.source.init_args.root={root / 'folder'}"]  # one sentence a shard: 2 train shards
        make_shards([cfg("data/folder.yaml")], str(root / "tar"), per_shard=1, layout="image", overrides=folder)
        frames = [root / "folder" / "sentence0" / f"{i}.png" for i in range(3)]
        (root / "prompts.yaml").write_text(f"- {{images: [{frames[0]}, {frames[1]}], truth: [{frames[2]}]}}\n")
        (root / "prompts").mkdir()
        (root / "prompts" / "p0").symlink_to(root / "folder" / "sentence0")
    finally:
        os.chdir(cwd)
    return {
        "folder": root / "folder",
        "videos": root / "videos",
        "vqgan_ckpt": vqgan_ckpt,
        "shards": root / "shards",
        "stream": root / "stream",
        "lvm_ckpt": lvm_ckpt,
        "tar": root / "tar",
        "prompts_file": root / "prompts.yaml",
        "prompts_folder": root / "prompts",
    }


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto) on 127.0.0.1 for this worker; `.env()` is the environment that points at it."""
    from s3_server import start

    server, thread = start()
    yield server
    thread.stop()


@pytest.fixture(scope="session")
def s3_server_checking_credentials():
    """An S3-protocol server (moto, own process) that refuses a wrong key pair; `.env()` has a valid one."""
    from s3_server import start_checking_credentials

    server, process = start_checking_credentials()
    yield server
    process.terminate()
    process.wait()


@pytest.fixture(scope="session")
def warm_cli():
    """The warm `main.py` server of this worker (tests/cli_runner.py `WarmCLI`): `run`, or `start` + `wait`."""
    from cli_runner import WarmCLI

    runner = WarmCLI()
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def main_py(warm_cli):
    """`main_py(argv, cwd=None, env=None)`: `python main.py argv` as a subprocess runs it (its own process, `main.py` as
    `__main__`, exit code, stdout, stderr), forked from one warm server per worker so the imports are paid once."""
    return warm_cli.run
