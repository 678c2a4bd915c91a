"""Checkpoint writes that never clobber a good checkpoint.

Lightning's default saves through an fsspec transaction whose temp file lives in the system temp dir, so on
clusters (checkpoints on a network filesystem) the final move is a copy and a kill mid-copy leaves a truncated file.
Here the temp file sits next to the target and is fsynced, then renamed: the old file stays loadable until the new
one is complete.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH

from lvm_pl.atomic import atomic_path
from lvm_pl.console import UserError
from lvm_pl.safe_load import load_error


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
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
