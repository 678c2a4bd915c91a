"""diffusers interop: lvm-pl VQGAN checkpoints <-> diffusers `VQModel` directories.

Our autoencoder names its parameters as `VQModel` does, except the codebook (`quantizer.embedding.weight` here,
`quantize.embedding.weight` there), so both directions are a rename. Both sides take images in [-1, 1] (diffusers'
VQ pipelines normalise with `VaeImageProcessor`, x * 2 - 1) and decode unclamped latents; our `decode` clamps to
[-1, 1], as diffusers' post-processing does, so no value-range conversion is needed.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.pytorch.cli import instantiate_module

from lvm_pl.atomic import atomic_dir, torch_save
from lvm_pl.console import UserError, say
from lvm_pl.vqgan import load_tokenizer
from lvm_pl.vqgan.autoencoder import Autoencoder
from lvm_pl.vqgan.module import VQGAN
from lvm_pl.vqgan.quantizers import VectorQuantizer

OUR_CODEBOOK, DIFFUSERS_CODEBOOK = "quantizer.embedding.weight", "quantize.embedding.weight"
DOWN_TYPES = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}  # block type -> has attention
UP_TYPES = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def autoencoder_args(ae: Autoencoder) -> dict[str, Any]:
    """The `Autoencoder` init args of a built autoencoder, read off its modules (so any checkpoint's works)."""
    enc = ae.encoder
    return {
        "block_out_channels": [b.resnets[-1].conv2.out_channels for b in enc.down_blocks],
        "layers_per_block": len(enc.down_blocks[0].resnets),
        "latent_channels": enc.conv_out.out_channels,
        "embed_dim": ae.embed_dim,
        "norm_num_groups": enc.conv_norm_out.num_groups,
        "attention_levels": [i for i, b in enumerate(enc.down_blocks) if b.attentions is not None],
        "mid_attention": enc.mid_block.attentions is not None,
        "in_channels": enc.conv_in.in_channels,
        "out_channels": ae.decoder.conv_out.out_channels,
    }


def diffusers_config(ae_args: dict[str, Any], codebook_size: int) -> dict[str, Any]:
    """`VQModel` init kwargs equivalent to our autoencoder args and codebook size."""
    levels = len(ae_args["block_out_channels"])
    attn = set(ae_args["attention_levels"])
    return {
        "in_channels": ae_args["in_channels"],
        "out_channels": ae_args["out_channels"],
        "down_block_types": [("AttnDownEncoderBlock2D" if i in attn else "DownEncoderBlock2D") for i in range(levels)],
        # up block i works at encoder level levels-1-i
        "up_block_types": [
            ("AttnUpDecoderBlock2D" if levels - 1 - i in attn else "UpDecoderBlock2D") for i in range(levels)
        ],
        "block_out_channels": list(ae_args["block_out_channels"]),
        "layers_per_block": ae_args["layers_per_block"],
        "act_fn": "silu",
        "latent_channels": ae_args["latent_channels"],
        "num_vq_embeddings": codebook_size,
        "norm_num_groups": ae_args["norm_num_groups"],
        "vq_embed_dim": ae_args["embed_dim"],
        "norm_type": "group",
        "mid_block_add_attention": ae_args["mid_attention"],
        "lookup_from_codebook": True,  # decode(ids, force_not_quantize=True) looks ids up, as the amused config does
    }


def _check_exportable(model: VQGAN) -> None:
    """UserError naming the first option diffusers' VQModel cannot express."""
    q = model.quantizer
    if not isinstance(q, VectorQuantizer):
        raise UserError(
            f"model.quantizer.class_path={_class_path(type(q))}: diffusers' VQModel has a codebook VectorQuantizer only"
        )
    if q.code_dim != q.embed_dim:
        raise UserError(
            f"model.quantizer.code_dim={q.code_dim}: diffusers' VectorQuantizer has no low-dimensional lookup "
            f"(code_dim must equal embed_dim={q.embed_dim})"
        )
    if q.normalize:
        raise UserError("model.quantizer.normalize=true: diffusers' VectorQuantizer has no cosine lookup")


def to_diffusers(model: VQGAN) -> torch.nn.Module:
    """diffusers' `VQModel` holding (fp32 copies of) the weights `model` encodes and decodes with (its EMA copy when
    it has one); UserError names the first option VQModel cannot express."""
    from diffusers import VQModel

    _check_exportable(model)
    ae = model._eval_autoencoder()
    ref = VQModel(**diffusers_config(autoencoder_args(ae), model.codebook_size))
    state = {k: v.detach().float() for k, v in ae.state_dict().items()}
    state[DIFFUSERS_CODEBOOK] = model.quantizer.embedding.weight.detach().float()
    ref.load_state_dict(state)  # strict: a name or shape that does not map is a bug here, not a user error
    return ref.eval()


def export_diffusers(checkpoint: str, out_dir: str) -> None:
    """Write a VQGAN checkpoint as a diffusers VQModel directory (config.json + diffusion_pytorch_model.safetensors).

    The autoencoder used for encode/decode (the EMA copy when there is one) is exported; the directory appears whole
    or not at all (written in a temporary sibling, then renamed).
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"out_dir={out_dir}: exists and is not empty; choose a new directory")
    ref = to_diffusers(load_tokenizer(checkpoint))
    with atomic_dir(out) as tmp:
        ref.save_pretrained(tmp, safe_serialization=True)
    say(f"exported {checkpoint} -> {out_dir} ({sum(p.numel() for p in ref.parameters()):,} parameters)")


def _read_diffusers_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"diffusers_dir={path}: no config.json; expected a diffusers VQModel directory")
    cfg = json.loads(config_file.read_text())
    if cfg.get("_class_name", "VQModel") != "VQModel":
        raise UserError(f"{config_file}: _class_name={cfg['_class_name']!r}, expected 'VQModel'")
    return cfg


def autoencoder_args_from_diffusers(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """Our `Autoencoder` init args (plus `codebook_size`) from a VQModel config.json; UserError names the first
    unsupported option."""
    defaults = {  # VQModel's own defaults, for keys a config.json leaves out
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D"],
        "block_out_channels": [64],
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 3,
        "num_vq_embeddings": 256,
        "norm_num_groups": 32,
        "vq_embed_dim": None,
        "norm_type": "group",
        "mid_block_add_attention": True,
    }
    cfg = defaults | cfg
    for key in ("in_channels", "out_channels"):
        if cfg[key] != 3:
            raise UserError(f"{where}: {key}={cfg[key]}: lvm-pl images are RGB (3 channels)")
    if cfg["act_fn"] != "silu":
        raise UserError(f"{where}: act_fn={cfg['act_fn']!r}: the lvm-pl autoencoder uses silu")
    if cfg["norm_type"] != "group":
        raise UserError(f"{where}: norm_type={cfg['norm_type']!r}: the lvm-pl decoder has GroupNorm only")
    down, up, channels = list(cfg["down_block_types"]), list(cfg["up_block_types"]), list(cfg["block_out_channels"])
    for i, t in enumerate(down):
        if t not in DOWN_TYPES:
            raise UserError(f"{where}: down_block_types[{i}]={t!r}: supported are {sorted(DOWN_TYPES)}")
    for i, t in enumerate(up):
        if t not in UP_TYPES:
            raise UserError(f"{where}: up_block_types[{i}]={t!r}: supported are {sorted(UP_TYPES)}")
    if not len(down) == len(up) == len(channels):
        raise UserError(
            f"{where}: {len(down)} down blocks, {len(up)} up blocks, {len(channels)} block_out_channels: "
            "lvm-pl mirrors the encoder in the decoder (one each per level)"
        )
    levels = len(channels)
    attention_levels = [i for i, t in enumerate(down) if DOWN_TYPES[t]]
    for i, t in enumerate(up):
        if UP_TYPES[t] != (levels - 1 - i in attention_levels):
            raise UserError(
                f"{where}: up_block_types[{i}]={t!r}: lvm-pl puts attention in the decoder where the encoder "
                f"has it (down_block_types[{levels - 1 - i}]={down[levels - 1 - i]!r})"
            )
    return {
        "codebook_size": cfg["num_vq_embeddings"],
        "block_out_channels": channels,
        "layers_per_block": cfg["layers_per_block"],
        "latent_channels": cfg["latent_channels"],
        "embed_dim": cfg["vq_embed_dim"] or cfg["latent_channels"],
        "norm_num_groups": cfg["norm_num_groups"],
        "attention_levels": attention_levels,
        "mid_attention": bool(cfg["mid_block_add_attention"]),
        "in_channels": 3,
        "out_channels": 3,
    }


def import_diffusers(diffusers_dir: str, out: str) -> None:
    """Convert a diffusers VQModel directory into an lvm-pl VQGAN checkpoint (`load_tokenizer`- and `--ckpt_path`-able).

    The checkpoint's loss is a default VQGANLoss (PatchGAN discriminator, freshly initialised; no perceptual term):
    a fine-tuning run sets its own loss in the config.
    """
    from diffusers import VQModel

    path = Path(diffusers_dir)
    cfg = _read_diffusers_config(path)
    ae_args = autoencoder_args_from_diffusers(cfg, str(path / "config.json"))
    codebook_size = ae_args.pop("codebook_size")
    # `from_pretrained` on a local directory reads it only (no download) and renames legacy attention keys
    try:
        weights = VQModel.from_pretrained(str(path)).state_dict()
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(
            f"diffusers_dir={diffusers_dir}: cannot load its weights ({str(err).splitlines()[0]})"
        ) from None
    hparams = {
        "_class_path": _class_path(VQGAN),
        # what LightningCLI stores, so `load_from_checkpoint` instantiates the class_path dicts below
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
        "autoencoder": {"class_path": _class_path(Autoencoder), "init_args": ae_args},
        "quantizer": {
            "class_path": _class_path(VectorQuantizer),
            # diffusers' VQModel quantizes with beta 0.25; its codes are trained, so no data init
            "init_args": {"codebook_size": codebook_size, "embed_dim": ae_args["embed_dim"], "beta": 0.25},
        },
        "loss": {
            "class_path": "lvm_pl.vqgan.losses.VQGANLoss",
            "init_args": {
                "discriminator": {"class_path": "lvm_pl.vqgan.discriminators.PatchGAN", "init_args": {}},
                "perceptual": None,
            },
        },
    }
    with torch.random.fork_rng(), warnings.catch_warnings():
        torch.manual_seed(0)  # the fresh discriminator: the same import gives the same file
        # outside LightningCLI save_hyperparameters sees the built parts; the checkpoint gets `hparams` instead
        warnings.filterwarnings("ignore", message=r"Attribute '.*' is an instance of `nn.Module`")
        model = instantiate_module(VQGAN, {k: v for k, v in hparams.items() if k != "_instantiator"})
    codebook = weights.pop(DIFFUSERS_CODEBOOK)
    try:
        model.autoencoder.load_state_dict(weights)
        model.quantizer.embedding.weight.data.copy_(codebook)
    except RuntimeError as err:
        raise UserError(f"{diffusers_dir}: weights do not fit its config.json ({str(err).splitlines()[1]})") from None
    checkpoint = {
        "state_dict": model.state_dict(),
        VQGAN.CHECKPOINT_HYPER_PARAMS_KEY: hparams,
        "pytorch-lightning_version": lightning.__version__,
    }
    torch_save(out, checkpoint)
    say(f"imported {diffusers_dir} -> {out} ({codebook_size} codes, f={2 ** (len(ae_args['block_out_channels']) - 1)})")
