"""diffusers interop: lvm-pl VQGAN checkpoints <-> diffusers `VQModel` directories.

Our autoencoder names its parameters as `VQModel` does, except the codebook (`quantizer.embedding.weight` here,
`quantize.embedding.weight` there), so both directions are a rename. The pixel range is the tokenizer's own:
amused's VQModel works in [0, 1] (its pipeline builds `VaeImageProcessor(do_normalize=False)`), ours in [-1, 1];
the export records it in config.json as `lvm_input_range` and `import-vqgan` (lvm_pl/interop/vqgan_import.py) reads
it back, defaulting to [0, 1] for a released directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lvm_pl.atomic import atomic_dir
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

    Args:
        checkpoint: the lvm-pl VQGAN checkpoint to export.
        out_dir: the directory to write.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"out_dir={out_dir}: exists and is not empty; choose a new directory")
    model = load_tokenizer(checkpoint)
    ref = to_diffusers(model)
    ref.register_to_config(lvm_input_range=list(model.input_range))  # import-vqgan reads the range back
    with atomic_dir(out) as tmp:
        ref.save_pretrained(tmp, safe_serialization=True)
    say(f"exported {checkpoint} -> {out_dir} ({sum(p.numel() for p in ref.parameters()):,} parameters)")


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
