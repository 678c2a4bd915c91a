"""Scaffolding the tests share: a quiet one-CPU Trainer, a module saved as a checkpoint, the CLI arguments."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import torch
import yaml
from lightning.pytorch import LightningModule, Trainer
from torch import nn

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent  # on sys.path of a subprocess that imports a test module (and this one)
USAGE = re.compile(r"^#\s*(?:Usage:\s*)?(python main\.py .*)$")
# CLI flags of a run that logs, checkpoints and prints nothing (the configs' callbacks are dropped whole)
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]"]


def config(name: str) -> str:
    """The path of `configs/<name>` in this repository, as a CLI argument."""
    return str(REPO / "configs" / name)


def cpu_trainer(**kwargs) -> Trainer:
    """A Trainer on one CPU without logger, checkpoints, progress bar or model summary; `kwargs` override any of it."""
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return Trainer(**{**defaults, **kwargs})


def save_checkpoint(module: LightningModule, path: str | Path) -> Path:
    """`module` written as a Lightning checkpoint (its hyper-parameters and weights), untrained."""
    trainer = cpu_trainer(max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return Path(path)


def lvm_shape(n_layer: int = 1, n_embd: int = 32, n_head: int = 2, intermediate_size: int = 64, **more) -> str:
    """The `--model.init_args.overrides` flag of a small LVM (a few hundred thousand parameters)."""
    fields = {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "intermediate_size": intermediate_size, **more}
    return "--model.init_args.overrides={" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}"


def usage(rel: str) -> list[str]:
    """The documented command of a config (`rel` from the repository root): its first comment line that starts with
    `python main.py` (continued by lines ending in a backslash), as argv after `python main.py`."""
    lines = (REPO / rel).read_text().splitlines()
    for i, line in enumerate(lines):
        found = USAGE.match(line)
        if found:
            text = found.group(1)
            while text.endswith("\\"):
                i += 1
                text = text[:-1] + " " + lines[i].lstrip("#").strip()
            return shlex.split(text)[2:]
    raise AssertionError(f"{rel} has no usage line ('# Usage: python main.py ...')")


def config_files(argv: list[str]) -> list[str]:
    """The `-c` files of a command, in order; `<data>.yaml` (any data config) stands for the built-in one."""
    files = [argv[i + 1] for i, a in enumerate(argv) if a in ("-c", "--config")]
    return [f.replace("<data>.yaml", "configs/data/builtin.yaml") for f in files]


class GreyTokenizer(nn.Module):
    """A stand-in for the VQGAN (4x downsampling): each 4x4 patch's mean quantized to `codebook_size` grey levels,
    and back."""

    def __init__(self, codebook_size: int) -> None:
        super().__init__()
        self.codebook_size, self.downsample_factor = codebook_size, 4

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        grey = nn.functional.avg_pool2d(images.mean(1, keepdim=True), 4)[:, 0]  # [B, h, w] in [-1, 1]
        return ((grey + 1) / 2 * (self.codebook_size - 1)).round().long()

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        grey = indices.float() / (self.codebook_size - 1) * 2 - 1  # [B, h, w]
        return nn.functional.interpolate(grey[:, None], scale_factor=4).expand(-1, 3, -1, -1)


def compose(files: list[str]) -> dict:
    """The YAMLs (paths from the repository root) merged the way the CLI composes them: later files win, nested
    dicts merge, a different class_path starts its init_args afresh, a list is replaced whole."""

    def merge(a, b):
        if (
            isinstance(a, dict)
            and isinstance(b, dict)
            and a.get("class_path", b.get("class_path")) == b.get("class_path", a.get("class_path"))
        ):
            return {**a, **{k: merge(a.get(k), v) for k, v in b.items()}}
        return b

    out: dict = {}
    for f in files:
        out = merge(out, yaml.safe_load((REPO / f).read_text()) or {})
    return out
