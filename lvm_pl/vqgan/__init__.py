"""The VQGAN tokenizer stage: images [-1, 1] <-> token grids (each tokenizer maps them to its own pixel range)."""

from __future__ import annotations

from pathlib import Path

import torch

from lvm_pl.console import UserError
from lvm_pl.quiet import ignoring
from lvm_pl.safe_load import load_torch_file


def load_tokenizer(path: str | Path) -> torch.nn.Module:
    """A frozen eval-mode VQGAN from a `main.py fit` checkpoint; UserError names a missing or foreign file."""
    from lvm_pl.vqgan.module import VQGAN

    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer checkpoint {path} does not exist")
    ckpt = load_torch_file(path, f"tokenizer checkpoint {path}", mmap=True)  # mapped: a cheap look before the load
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "autoencoder" not in hparams or "quantizer" not in hparams:
        raise UserError(f"{path} is not a VQGAN checkpoint (no autoencoder/quantizer hyperparameters)")
    # Lightning rebuilds the components from the checkpoint's hyper-parameters and passes them in as modules, then
    # advises `save_hyperparameters(ignore=[...])`; the checkpoint keeps their configs (from the CLI) for reloads
    module_advice = r"Attribute '(autoencoder|quantizer|loss)' is an instance of `nn.Module`"
    with ignoring((module_advice, r"lightning\.pytorch\.utilities\.parsing")):
        model = VQGAN.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    model.requires_grad_(False)
    return model.eval()
