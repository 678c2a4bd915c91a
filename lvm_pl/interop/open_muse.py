"""open-muse interop: the released LVM tokenizer (open-muse's `VQGANModel`, the official repository's
`vqvae_muse.py`) read into our autoencoder. This file is the one place that knows open-muse's names.

open-muse and diffusers' `VQModel` (hence ours) are the same network under other names: `encoder.down.{i}.block.{j}`
is `encoder.down_blocks.{i}.resnets.{j}`, `nin_shortcut` is `conv_shortcut`, attention projections are 1x1 convs
(our linears), and the decoder's `up` list is stored in reverse level order. Its pixels are in [0, 1].
"""

from __future__ import annotations

import re
from typing import Any

import torch

from lvm_pl.console import UserError

GROUPS = 32  # open-muse's GroupNorms are hard-coded to 32 groups
CODEBOOK = "quantize.embedding.weight"


def autoencoder_args_from_open_muse(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """Our `Autoencoder` init args (plus `codebook_size`) from a `VQGANModel` config.json; UserError names the first
    option our autoencoder cannot express."""
    defaults = {  # VQGANModel's own defaults, for keys a config.json leaves out
        "resolution": 256,
        "num_channels": 3,
        "hidden_channels": 128,
        "channel_mult": [1, 1, 2, 2, 4],
        "num_res_blocks": 2,
        "decoder_res_blocks": None,
        "extra_mid_res_blocks": None,
        "decoder_hidden_channels": None,
        "decoder_channel_mult": None,
        "attn_resolutions": [16],
        "no_attn_mid_block": False,
        "z_channels": 256,
        "num_embeddings": 1024,
        "quantized_embed_dim": 256,
        "resample_with_conv": True,
    }
    cfg = defaults | cfg
    mult, hidden, blocks = list(cfg["channel_mult"]), cfg["hidden_channels"], cfg["num_res_blocks"]
    dec_mult = cfg["decoder_channel_mult"]
    mirror = "the lvm-pl decoder mirrors the encoder"
    checks = [
        ("num_channels", cfg["num_channels"] == 3, "lvm-pl images are RGB (3 channels)"),
        ("channel_mult", bool(mult) and mult[0] == 1, "its first level must work at hidden_channels"),
        ("resample_with_conv", cfg["resample_with_conv"] is True, "lvm-pl resamples with convolutions"),
        ("extra_mid_res_blocks", cfg["extra_mid_res_blocks"] in (None, 0), mirror),
        ("decoder_res_blocks", cfg["decoder_res_blocks"] in (None, blocks), mirror),
        ("decoder_hidden_channels", cfg["decoder_hidden_channels"] in (None, hidden), mirror),
        ("decoder_channel_mult", dec_mult is None or list(dec_mult) == mult, mirror),
    ]
    for key, ok, why in checks:
        if not ok:
            raise UserError(f"{where}: {key}={cfg[key]!r} is not supported ({why})")
    channels = [hidden * m for m in mult]
    if any(c % GROUPS for c in channels):
        raise UserError(f"{where}: hidden_channels={hidden} x channel_mult={mult}: channels must be multiples of 32")
    resolutions = [cfg["resolution"] // 2**i for i in range(len(mult))]
    attention_levels = [i for i, r in enumerate(resolutions) if r in set(cfg["attn_resolutions"] or [])]
    if attention_levels and blocks < 2:
        # open-muse builds these attentions but applies a level's only when it has more than one
        raise UserError(f"{where}: attn_resolutions={cfg['attn_resolutions']} with num_res_blocks=1 is not supported")
    return {
        "codebook_size": cfg["num_embeddings"],
        "block_out_channels": channels,
        "layers_per_block": blocks,
        "latent_channels": cfg["z_channels"],
        "embed_dim": cfg["quantized_embed_dim"],
        "norm_num_groups": GROUPS,
        "attention_levels": attention_levels,
        "mid_attention": not cfg["no_attn_mid_block"],
        "in_channels": 3,
        "out_channels": 3,
    }


_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _rename(name: str, levels: int) -> str | None:
    """open-muse parameter name -> ours (None: not a parameter we know)."""
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m:
        part, kind, level, sub, j, layer, leaf = m.groups()
        blocks = "down_blocks" if kind == "down" else "up_blocks"
        index = int(level) if kind == "down" else levels - 1 - int(level)  # open-muse's `up` is stored reversed
        if sub == "block":
            layer = "conv_shortcut" if layer == "nin_shortcut" else layer
            return f"{part}.{blocks}.{index}.resnets.{j}.{layer}.{leaf}"
        return f"{part}.{blocks}.{index}.attentions.{j}.{_ATTENTION.get(layer, layer)}.{leaf}"
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)\.(\d+)\.(downsample|upsample)\.conv\.(weight|bias)", name)
    if m:
        part, kind, level, resample, leaf = m.groups()
        index = int(level) if kind == "down" else levels - 1 - int(level)
        blocks = "down_blocks" if kind == "down" else "up_blocks"
        return f"{part}.{blocks}.{index}.{resample}rs.0.conv.{leaf}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(\w+)\.(weight|bias)", name)
    if m:
        part, sub, layer, leaf = m.groups()
        if sub == "attn_1":
            return f"{part}.mid_block.attentions.0.{_ATTENTION.get(layer, layer)}.{leaf}"
        return f"{part}.mid_block.resnets.{int(sub[-1]) - 1}.{layer}.{leaf}"
    m = re.fullmatch(r"(encoder|decoder)\.norm_out\.(weight|bias)", name)
    if m:
        return f"{m.group(1)}.conv_norm_out.{m.group(2)}"
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)|(post_)?quant_conv\.(weight|bias)", name):
        return name
    return None


def from_open_muse(state: dict[str, torch.Tensor], levels: int, where: str) -> tuple[dict, torch.Tensor]:
    """open-muse `VQGANModel` state dict -> (our autoencoder's state dict, the codebook [K, D])."""
    if CODEBOOK not in state:
        raise UserError(f"{where}: no {CODEBOOK}; not an open-muse VQGANModel's weights")
    codebook, out = state[CODEBOOK], {}
    for name, tensor in state.items():
        if name == CODEBOOK:
            continue
        ours = _rename(name, levels)
        if ours is None:
            raise UserError(f"{where}: unexpected weight {name!r} for an open-muse VQGANModel")
        if ".attentions." in ours and ".group_norm." not in ours and tensor.dim() == 4:
            tensor = tensor[:, :, 0, 0]  # 1x1 conv [C, C, 1, 1] -> linear [C, C]
        out[ours] = tensor
    return out, codebook
