"""Checkpoint writes that never clobber a good checkpoint, and reads that know which stage wrote a checkpoint.

Lightning's default saves through an fsspec transaction whose temp file lives in the system temp dir, so on
clusters (checkpoints on a network filesystem) the final move is a copy and a kill mid-copy leaves a truncated file.
Here the temp file sits next to the target and is fsynced, then renamed: the old file stays loadable until the new
one is complete.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH

from lvm_pl.atomic import atomic_path
from lvm_pl.console import UserError
from lvm_pl.safe_load import load_error, load_torch_file

# the stages: class path -> what it is and the config family that builds it (for "use this instead")
STAGES = {
    "lvm_pl.vqgan.module.VQGAN": ("a VQGAN tokenizer checkpoint", "configs/vqgan/<size>.yaml"),
    "lvm_pl.lvm.module.LVM": ("an LVM checkpoint", "configs/lvm/<size>.yaml"),
}
TOKENIZERS = {"lvm_pl.vqgan.module.VQGAN"}
LVM_CLASS = "lvm_pl.lvm.module.LVM"


def saved_class_path(path: str | Path) -> str | None:
    """The LightningModule class a checkpoint was saved from (LightningCLI records it), None when not recorded."""
    if not Path(path).is_file():
        raise UserError(f"ckpt_path={path}: no such checkpoint file")
    checkpoint = load_torch_file(path, f"ckpt_path={path}", mmap=True)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    return hparams.get("_class_path") if isinstance(hparams, dict) else None


def check_stage(path: str | Path, class_path: str | None, command: str, key: str = "ckpt_path") -> None:
    """A checkpoint saved from another class than `class_path` (the model `command` builds) is a UserError naming
    both and the command that loads it; checkpoints without a recorded class pass (their module checks its keys)."""
    if not Path(path).is_file() or class_path is None:
        return
    saved = saved_class_path(path)
    if saved is None or saved == class_path:
        return
    what, config = STAGES.get(saved, (f"a checkpoint of {saved}", f"a config with model.class_path: {saved}"))
    instead = f"python main.py {command} -c {config} ... --ckpt_path {path}"
    if key != "ckpt_path":  # a non-Trainer command: the Trainer commands of that class load it
        instead = f"python main.py test|predict -c {config} ... --ckpt_path {path}"
    lvm_wants_tokenizer = saved in TOKENIZERS and class_path == LVM_CLASS and key == "ckpt_path"
    hint = f" (or as the LVM's tokenizer: --model.init_args.tokenizer={path})" if lvm_wants_tokenizer else ""
    raise UserError(f"{key}={path}: {what} ({saved}), but {command} needs {class_path}; use {instead}{hint}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` that writes local checkpoints with temp file + fsync + rename (remote paths: Lightning's);
    reads are always weights-only; a missing, unreadable or code-carrying `--ckpt_path` is a `UserError` naming it."""

    def load_checkpoint(
        self, path: _PATH, map_location: Callable | None = lambda s, loc: s, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # `weights_only` is ignored on purpose: a checkpoint is data, whoever asks (Trainer.fit(weights_only=False))
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise UserError(f"ckpt_path={path}: no such checkpoint file") from None
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
            raise load_error(f"ckpt_path={path}", err) from None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        protocol = get_filesystem(path).protocol
        if "file" not in (protocol if isinstance(protocol, tuple) else (protocol,)):
            return super().save_checkpoint(checkpoint, path)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)  # into a file object: a full disk is an OSError (ENOSPC), named by atomic_path
