"""`import-vqgan`: a released tokenizer directory (open-muse `VQGANModel` or diffusers `VQModel`) -> an lvm-pl VQGAN
checkpoint that `test`, the tokenize `predict` and the LVM's `predict`/`prompt` take.

Both layouts hold the same network; names are mapped in `open_muse.py` and `diffusers_vq.py`. Released tokenizers
work on pixels in [0, 1] (the official demo divides by 255; diffusers' amused pipeline does not normalise), so the
checkpoint gets `input_range: [0, 1]` unless the directory says otherwise (our `export-diffusers` records its own).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.pytorch.cli import instantiate_module

from lvm_pl.atomic import torch_save
from lvm_pl.console import UserError, say
from lvm_pl.interop import diffusers_vq, open_muse
from lvm_pl.interop.weights import read_weights
from lvm_pl.safe_load import load_torch_file
from lvm_pl.vqgan.autoencoder import Autoencoder
from lvm_pl.vqgan.module import VQGAN
from lvm_pl.vqgan.quantizers import VectorQuantizer

RELEASED_RANGE = (0.0, 1.0)
RANGE_KEY = "lvm_input_range"  # written into config.json by export-diffusers


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not path.is_dir():
        raise UserError(f"source_dir={path}: not a directory")
    if not config_file.is_file():
        raise UserError(f"source_dir={path}: no config.json; expected an open-muse VQGANModel or diffusers VQModel")
    try:
        cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config_file}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{config_file}: expected a JSON object")
    return cfg


def _layout_of(cfg: dict[str, Any], where: str) -> str:
    """'open-muse' or 'diffusers', from `_class_name` or, without one, from the keys only each has."""
    name = cfg.get("_class_name")
    if name == "VQGANModel" or (name is None and "channel_mult" in cfg and "z_channels" in cfg):
        return "open-muse"
    if name == "VQModel" or (name is None and "block_out_channels" in cfg and "num_vq_embeddings" in cfg):
        return "diffusers"
    raise UserError(f"{where}: _class_name={name!r}: neither an open-muse VQGANModel nor a diffusers VQModel config")


def _diffusers_weights(path: Path) -> dict[str, torch.Tensor]:
    from diffusers import VQModel

    # `from_pretrained` on a local directory reads it only (no download), reads every weight file form and renames
    # legacy attention keys; a pickled weight file is first checked weights-only here, so a refusal names it
    for file in sorted(path.glob("*.bin")):
        load_torch_file(file, mmap=True)
    try:
        return VQModel.from_pretrained(str(path), local_files_only=True, low_cpu_mem_usage=False).state_dict()
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"source_dir={path}: cannot load its weights ({str(err).splitlines()[0]})") from None


def import_vqgan(source_dir: str, out: str, input_range: tuple[float, float] | None = None) -> None:
    """Convert a released tokenizer directory (open-muse VQGANModel or diffusers VQModel: config.json + weights as
    `.safetensors` or `.bin`, single or sharded, any float dtype) into an lvm-pl VQGAN checkpoint.

    The checkpoint's loss is a default VQGANLoss (fresh PatchGAN, no perceptual term): a fine-tuning run sets its own.

    Args:
        source_dir: the tokenizer directory (config.json and the weights).
        out: the lvm-pl VQGAN checkpoint file to write.
        input_range: the pixel range the tokenizer was trained on, e.g. [0, 1]; default: the directory's
            `lvm_input_range`, else [0, 1] (the released tokenizer's).
    """
    path = Path(source_dir)
    cfg = _read_config(path)
    where = str(path / "config.json")
    if _layout_of(cfg, where) == "open-muse":
        ae_args = open_muse.autoencoder_args_from_open_muse(cfg, where)
        levels = len(ae_args["block_out_channels"])
        weights, codebook = open_muse.from_open_muse(
            read_weights(path, ("model", "pytorch_model", "diffusion_pytorch_model")), levels, source_dir
        )
        source = "open-muse VQGANModel"
    else:
        ae_args = diffusers_vq.autoencoder_args_from_diffusers(cfg, where)
        weights = _diffusers_weights(path)
        codebook = weights.pop(diffusers_vq.DIFFUSERS_CODEBOOK)
        source = "diffusers VQModel"
    if input_range is None:
        input_range = tuple(cfg.get(RANGE_KEY, RELEASED_RANGE))
    codebook_size = ae_args.pop("codebook_size")
    hparams = {
        "_class_path": _class_path(VQGAN),
        # what LightningCLI stores, so `load_from_checkpoint` instantiates the class_path dicts below
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
        "autoencoder": {"class_path": _class_path(Autoencoder), "init_args": ae_args},
        "quantizer": {
            "class_path": _class_path(VectorQuantizer),
            # both quantize with beta 0.25; their codes are trained, so no data init
            "init_args": {"codebook_size": codebook_size, "embed_dim": ae_args["embed_dim"], "beta": 0.25},
        },
        "loss": {
            "class_path": "lvm_pl.vqgan.losses.VQGANLoss",
            "init_args": {
                "discriminator": {"class_path": "lvm_pl.vqgan.discriminators.PatchGAN", "init_args": {}},
                "perceptual": None,
            },
        },
        "input_range": [float(input_range[0]), float(input_range[1])],
    }
    with torch.random.fork_rng(), warnings.catch_warnings():
        torch.manual_seed(0)  # the fresh discriminator: the same import gives the same file
        # outside LightningCLI save_hyperparameters sees the built parts; the checkpoint gets `hparams` instead
        warnings.filterwarnings("ignore", message=r"Attribute '.*' is an instance of `nn.Module`")
        model = instantiate_module(VQGAN, {k: v for k, v in hparams.items() if k != "_instantiator"})
    try:
        model.autoencoder.load_state_dict({k: v.float() for k, v in weights.items()})
        model.quantizer.embedding.weight.data.copy_(codebook.float())
    except RuntimeError as err:
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise UserError(f"{source_dir}: weights do not match its config.json ({detail})") from None
    checkpoint = {
        "state_dict": model.state_dict(),
        VQGAN.CHECKPOINT_HYPER_PARAMS_KEY: hparams,
        "pytorch-lightning_version": lightning.__version__,
    }
    torch_save(out, checkpoint)
    f = 2 ** (len(ae_args["block_out_channels"]) - 1)
    say(f"imported {source} {source_dir} -> {out} ({codebook_size} codes, f={f}, pixels in {list(input_range)})")
