"""Bad input through the command line: each case ends with one line naming the file/key/value on stderr, exit code
2, no traceback and nothing written. Cases checked in other files are listed in docs/reliability.md."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import cpu_trainer, lvm_shape
from lightning.pytorch.demos.boring_classes import BoringModel
from PIL import Image

from datamodules.prompts import PromptDataModule
from lvm_pl import shards
from lvm_pl.tokens import TokenLayout

LAYOUT = TokenLayout(codebook_size=32, tokens_per_image=4, num_special=4)


def _lvm_args(repo_root: Path, data: Path) -> list[str]:
    return [
        "-c",
        str(repo_root / "configs/lvm/tiny.yaml"),
        f"--data.init_args.train={data}",
        f"--data.init_args.val={data}",
        "--data.init_args.seq_len=8",
        lvm_shape(),
        "--trainer.max_steps=2",
        "--trainer.enable_progress_bar=false",
    ]


@pytest.fixture
def inputs(tmp_path):
    """Token shards, a checkpoint of another LightningModule, a truncated checkpoint, a YAML with a misspelt key and
    one with an LVM key of before the settings were grouped."""
    rng = np.random.default_rng(0)
    shards.write_split(tmp_path / "data", "train", LAYOUT, [rng.integers(0, 32, size=(2, 4)) for _ in range(6)])
    trainer = cpu_trainer(max_steps=1)
    trainer.fit(BoringModel())
    trainer.save_checkpoint(tmp_path / "other_stage.ckpt")
    blob = (tmp_path / "other_stage.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({"trainer": {"max_stepz": 3}}))
    (tmp_path / "old.yaml").write_text(yaml.safe_dump({"model": {"init_args": {"lr": 0.1}}}))
    return tmp_path


# (name, subcommand + extra args, pattern the last stderr line must match); {tmp} is the fixture's folder.
# Unknown keys are jsonargparse's own error: usage, then `error:` and a few lines naming the key (matched over all).
CASES = [
    ("unknown_flag", ["fit", "--model.init_args.no_such_key=1"], r"(?s)\berror: .*\bno_such_key\b"),
    ("unknown_yaml_key", ["fit", "-c", "{tmp}/typo.yaml"], r"(?s)\berror: .*\bmax_stepz\b"),
    (
        "missing_checkpoint",
        ["validate", "--ckpt_path={tmp}/missing.ckpt"],
        r"^error: ckpt_path=.*missing.ckpt: no such checkpoint file$",
    ),
    (
        "wrong_stage_checkpoint",
        ["fit", "--ckpt_path={tmp}/other_stage.ckpt"],
        r"^error: ckpt_path=.*other_stage.ckpt: not an LVM checkpoint",
    ),
    (
        "layout_mismatch",
        ["fit", "--model.init_args.layout={{codebook_size: 64, tokens_per_image: 4, num_special: 4}}"],  # str.format
        r"^error: token layouts disagree: the LVM checkpoint has \{'codebook_size': 64, .*\}, the token shards"
        r" \(.*data/manifest.json\) has \{'codebook_size': 32, .*\}$",
    ),
    (
        "renamed_flag",
        ["fit", "--model.init_args.vocab_size=8292"],
        r"^error: --model.init_args.vocab_size: model.init_args.vocab_size is no longer an LVM argument;"
        r" use nothing: the vocabulary comes from the token layout$",
    ),
    (
        "renamed_yaml_key",
        ["fit", "-c", "{tmp}/old.yaml"],
        r"^error: .*old.yaml: model.init_args.lr is no longer an LVM argument; use model.init_args.optim.lr$",
    ),
]


# LightningCLI itself torch.loads `--ckpt_path` (to read its hyper-parameters) before the Trainer's checkpoint IO,
# so a truncated file raises there; main.py's LVMCLI must turn that into a UserError (change listed in the report).
TRUNCATED = (
    "truncated_checkpoint",
    ["validate", "--ckpt_path={tmp}/truncated.ckpt"],
    r"^error: ckpt_path=.*truncated.ckpt: not a readable checkpoint \(.+\)$",
)


def _run_cases(inputs: Path, repo_root: Path, cases: list[tuple[str, list[str], str]]) -> None:
    """Run the cases as concurrent subprocesses of `python main.py` (each pays the import time once) and check them."""
    env = {**os.environ, "PYTHONPATH": str(repo_root), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    procs = {}
    for name, args, _ in cases:
        cwd = inputs / name
        cwd.mkdir()
        command, *extra = [a.format(tmp=inputs) for a in args]
        argv = [sys.executable, str(repo_root / "main.py"), command, *_lvm_args(repo_root, inputs / "data"), *extra]
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True}
        procs[name] = subprocess.Popen(argv, cwd=cwd, env=env, **quiet)
    for name, _, pattern in cases:
        _, err = procs[name].communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip()]
        assert procs[name].returncode == 2, f"{name}: rc={procs[name].returncode}\n{err[-3000:]}"
        assert "Traceback" not in err, f"{name}:\n{err[-3000:]}"
        text = err if pattern.startswith("(?s)") else lines[-1]
        assert lines and re.search(pattern, text), f"{name}: stderr ends {lines[-3:]}"
        assert not list((inputs / name).rglob("*.ckpt")), f"{name}: a checkpoint was written"


@pytest.mark.slow  # seven `main.py` processes: ~150 s on 2 shared cores
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(inputs, repo_root):
    _run_cases(inputs, repo_root, CASES)


@pytest.mark.slow
def test_cli_truncated_checkpoint_is_one_line(inputs, repo_root):
    _run_cases(inputs, repo_root, [TRUNCATED])


def test_prompt_images_of_mixed_sizes_are_resized_to_the_data_size(tmp_path):
    """Mixed sizes are not an error: every prompt image is resized (shorter side) and centre-cropped to
    `data.image_size`, smaller ones upscaled, so a batch is one [B, N, 3, S, S] tensor."""
    sizes = [(20, 24), (50, 30), (16, 16), (9, 13)]  # (height, width)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    entries = [{"images": ["0.png", "1.png"]}, {"images": ["2.png", "3.png", "1.png"]}]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(entries))
    dm = PromptDataModule(file=str(tmp_path / "p.yaml"), image_size=16, batch_size=2)
    dm.setup()
    batch = next(iter(dm.predict_dataloader()))
    assert batch.prompt.shape == (2, 3, 3, 16, 16) and batch.num_prompt.tolist() == [2, 3]
    # the content survives the resize: a flat image of value v stays v (in [-1, 1])
    assert torch.allclose(batch.prompt[1, 1], torch.full((3, 16, 16), 40 * 3 / 127.5 - 1))
