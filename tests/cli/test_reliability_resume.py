"""Exact resume after `kill -9`: a `fit` killed at an arbitrary step and resumed with `--ckpt_path last` ends with
the same weights, optimizer and schedule, bit for bit, as an uninterrupted run of the same number of steps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import REPO, TESTS
from lightning.pytorch import Callback

from lvm_pl import shards
from lvm_pl.atomic import pid_alive
from lvm_pl.tokens import TokenLayout

LAYOUT = TokenLayout(codebook_size=32, tokens_per_image=4, num_special=4)
STEPS, EVERY = 12, 3  # 12 steps, a checkpoint every 3; 5 batches an epoch, so the run crosses two epoch ends


# a checkpoint save killed half-way: the temp file is written, then SIGKILL before the rename
KILLED_SAVE = """
import os, signal, torch
from lvm_pl.atomic import atomic_path

with atomic_path({path!r}) as tmp, open(tmp, "wb") as f:
    torch.save({{"weights": torch.zeros(1000)}}, f)
    os.kill(os.getpid(), signal.SIGKILL)
"""


class StepPacer(Callback):
    """Test helper: after each step, write the step to `path` and sleep, so the test can kill the run at a step."""

    def __init__(self, path: str, seconds: float = 0.0) -> None:
        self.path, self.seconds = Path(path), seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.path.write_text(str(trainer.global_step))
        time.sleep(self.seconds)


def _tiny_shards(directory: Path) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, LAYOUT.codebook_size, size=(2, LAYOUT.tokens_per_image)) for _ in range(9)]
    shards.write_split(directory, "train", LAYOUT, images)  # 9 x 10 tokens -> 89 labels -> 12 windows of 8 (+1 tail)


# per stage: its configs, the logger name its checkpoints live under, and the override that makes a run tiny
STAGES = {
    "lvm": {
        "configs": ["configs/lvm/tiny.yaml", "configs/data/tokens.yaml"],
        "model": {
            "overrides": {"n_layer": 1, "n_embd": 32, "n_head": 2, "intermediate_size": 64},
            "optim": {"warmup_steps": 2},
        },
        "data": {"train": "{data}", "val": None, "seq_len": 8, "batch_size": 2, "num_workers": 0},
    },
    "vqgan": {
        "configs": ["configs/vqgan/tiny.yaml", "configs/data/builtin.yaml"],
        "model": {"warmup_steps": 2},
        "data": {
            "image_size": 32,
            "batch_size": 4,
            "num_workers": 0,
            # 3 sentences of 2-3 images: ~8 images, 2 batches an epoch
            "source": {"init_args": {"splits": {"train": 3, "val": 2, "test": 2}, "sequence_length": [2, 3]}},
        },
    },
}


def _callbacks(repo_root: Path, stage: str, run_dir: Path, pace: float) -> list[dict]:
    """The stage config's callbacks with its ModelCheckpoint saving every EVERY steps, plus the pacer."""
    config = yaml.safe_load((repo_root / STAGES[stage]["configs"][0]).read_text())
    callbacks = config["trainer"].get("callbacks") or []
    found = [c for c in callbacks if c["class_path"].endswith(".ModelCheckpoint")]
    assert len(found) == 1, f"{STAGES[stage]['configs'][0]}: needs one ModelCheckpoint (dirpath, save_last)"
    (checkpoint,) = found
    assert checkpoint["init_args"]["save_last"] and checkpoint["init_args"]["dirpath"]
    checkpoint["init_args"]["every_n_train_steps"] = EVERY
    pacer = {"class_path": f"{__name__}.StepPacer", "init_args": {"path": str(run_dir / "step.txt"), "seconds": pace}}
    return [*callbacks, pacer]


def _override(repo_root: Path, stage: str, run_dir: Path, data: Path, pace: float) -> Path:
    """A config on top of the stage's configs that makes the run tiny, seeded and deterministic."""
    spec = STAGES[stage]
    config = {
        "seed_everything": 1234,
        "model": {"init_args": spec["model"]},
        "data": {"init_args": {k: (str(data) if v == "{data}" else v) for k, v in spec["data"].items()}},
        "trainer": {
            "max_steps": STEPS,
            "max_time": None,
            "deterministic": True,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
            "callbacks": _callbacks(repo_root, stage, run_dir, pace),
        },
    }
    path = run_dir / "override.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(REPO), str(TESTS), str(Path(__file__).parent)])
    return {**os.environ, "PYTHONPATH": path, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def _fit_args(repo_root: Path, stage: str, override: Path, *extra: str) -> list[str]:
    """`main.py`'s arguments: the stage's configs, then the override (run by the warm server as `python main.py`)."""
    configs = [arg for c in STAGES[stage]["configs"] for arg in ("-c", str(repo_root / c))]
    return ["fit", *configs, "-c", str(override), *extra]


def _last(repo_root: Path, stage: str, run_dir: Path) -> Path:
    config = yaml.safe_load((repo_root / STAGES[stage]["configs"][0]).read_text())
    (checkpoint,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(".ModelCheckpoint")]
    path = run_dir / checkpoint["init_args"]["dirpath"] / "last.ckpt"
    assert path.exists(), f"no {path}"
    return path


def _training_state(path: Path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # weights-only: a full checkpoint is plain data
    loop = ckpt["loops"]["fit_loop"]
    return {
        "global_step": ckpt["global_step"],
        "epoch": ckpt["epoch"],
        "state_dict": ckpt["state_dict"],
        "optimizer": ckpt["optimizer_states"],
        "scheduler": ckpt["lr_schedulers"],
        "batches": loop["epoch_loop.batch_progress"],
        "data": ckpt.get("datamodule_hyper_parameters"),
    }


def _assert_bitwise_equal(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: differs (max abs diff {(a.float() - b.float()).abs().max()})"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _assert_bitwise_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["lvm", "vqgan"])
def test_fit_killed_mid_run_resumes_to_identical_weights(tmp_path, repo_root, warm_cli, stage):
    """kill -9 after step 7 (last checkpoint at step 6), resume with `--ckpt_path last`: final state == reference.
    Each run is `python main.py fit ...` forked from the warm server (tests/cli_runner.py), its own process."""
    missing = [c for c in STAGES[stage]["configs"] if not (repo_root / c).exists()]
    if missing:
        pytest.skip(f"{stage} stage not on this checkout yet: {missing} missing")
    _tiny_shards(tmp_path / "data")
    env = _env()

    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    ref = warm_cli.run(_fit_args(repo_root, stage, _override(repo_root, stage, ref_dir, tmp_path / "data", 0.0)),
                       cwd=ref_dir, env=env)  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]

    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    override = _override(repo_root, stage, run_dir, tmp_path / "data", 0.5)
    started = warm_cli.start(_fit_args(repo_root, stage, override), cwd=run_dir, env=env)
    kill_after, deadline = 2 * EVERY + 1, time.monotonic() + 300
    step_file = run_dir / "step.txt"
    while not (step_file.exists() and step_file.read_text() and int(step_file.read_text()) >= kill_after):
        assert pid_alive(started.pid), started.err.read_text()[-3000:]
        assert time.monotonic() < deadline, "the run did not reach the kill step"
        time.sleep(0.05)
    os.kill(started.pid, signal.SIGKILL)
    assert warm_cli.wait(started).returncode == -signal.SIGKILL
    saved = torch.load(_last(repo_root, stage, run_dir), map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2 * EVERY
    # and a save killed half-way (SIGKILL skips the temp file's cleanup): the resumed run must remove its leftover
    checkpoints = _last(repo_root, stage, run_dir).parent
    killed = subprocess.run([sys.executable, "-c", KILLED_SAVE.format(path=str(checkpoints / "last.ckpt"))], env=env)
    assert killed.returncode == -signal.SIGKILL and len(list(checkpoints.glob(".last.ckpt.tmp-*"))) == 1

    unpaced = _override(repo_root, stage, run_dir, tmp_path / "data", 0.0)
    resumed = warm_cli.run(_fit_args(repo_root, stage, unpaced, "--ckpt_path=last"), cwd=run_dir, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint" in resumed.stderr, resumed.stderr
    assert not list(checkpoints.glob(".*.tmp-*")), "a killed save's temp file survived the resume"
    assert "removed 1 temp files left by killed writers" in resumed.stderr

    expected, got = _training_state(_last(repo_root, stage, ref_dir)), _training_state(_last(repo_root, stage, run_dir))
    assert expected["global_step"] == STEPS
    _assert_bitwise_equal(expected, got)
