"""The VQGAN tokenizer stage: images [-1, 1] <-> token grids (each tokenizer maps them to its own pixel range)."""

from __future__ import annotations

from pathlib import Path

import torch

from lvm_pl.console import UserError


def load_tokenizer(path: str | Path) -> torch.nn.Module:
    """A frozen eval-mode VQGAN from a `main.py fit` checkpoint; UserError names a missing or foreign file."""
    from lvm_pl.vqgan.module import VQGAN

    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"tokenizer checkpoint {path} cannot be read ({err.__class__.__name__})") from None
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "autoencoder" not in hparams or "quantizer" not in hparams:
        raise UserError(f"{path} is not a VQGAN checkpoint (no autoencoder/quantizer hyperparameters)")
    model = VQGAN.load_from_checkpoint(path, map_location="cpu")
    model.requires_grad_(False)
    return model.eval()
