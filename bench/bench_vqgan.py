"""VQGAN speed: encode (images -> code ids) and decode (ids -> images) images/s, ours vs diffusers' `VQModel`.

python -m bench.bench_vqgan [--quick] [--config configs/vqgan/muse_f16_8192.yaml] [--image-size 256] [--batch-size 4]

Both are the MUSE VQGAN architecture (f=16, 8192 codes; diffusers' amused `VQModel` config), timed side by side in
one process with calls alternating. Encode is everything from pixels to ids (diffusers: encoder, quant_conv, nearest
code); decode everything from ids to pixels (codebook lookup, post_quant_conv, decoder). Until a diffusers converter
exists both models hold their own random weights (speed does not depend on the values). Where `lvm_pl.vqgan` or the
config is missing, only the reference is measured and our figures are empty. Results: bench/results/bench_vqgan.json.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.common import ROOT, alternate, figure, median, vqgan_from_config, write_results
from lvm_pl.console import say

REFERENCE = "diffusers VQModel (amused/MUSE config)"
# diffusers' VQModel arguments of the MUSE VQGAN that LVM tokenizes with (diffusers' scripts/convert_amused.py)
MUSE_VQMODEL = dict(
    act_fn="silu",
    block_out_channels=[128, 256, 256, 512, 768],
    down_block_types=["DownEncoderBlock2D"] * 5,
    up_block_types=["UpDecoderBlock2D"] * 5,
    in_channels=3,
    out_channels=3,
    latent_channels=64,
    layers_per_block=2,
    norm_num_groups=32,
    num_vq_embeddings=8192,
    sample_size=32,
    mid_block_add_attention=False,
    lookup_from_codebook=True,
)


def reference_model(device: str) -> nn.Module:
    """diffusers' VQModel with the MUSE architecture, seeded random weights, eval mode."""
    from diffusers import VQModel

    torch.manual_seed(0)
    return VQModel(**MUSE_VQMODEL).to(device).eval()


def reference_encode(vq: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> code ids [B, h, w], through the encoder, quant_conv and nearest-code search."""
    latents = vq.encode(images).latents  # [B, C, h, w]
    _, _, (_, _, ids) = vq.quantize(latents)
    return ids.view(latents.shape[0], *latents.shape[2:])


def reference_decode(vq: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Code ids [B, h, w] -> images [B, 3, H, W], looking the codes up in the codebook."""
    b, h, w = ids.shape
    shape = (b, h, w, vq.config.latent_channels)
    return vq.decode(ids.flatten(), force_not_quantize=True, shape=shape).sample


def our_model(config: Path, device: str) -> nn.Module | None:
    """Our VQGAN module built from the `model:` section of `config`; None while lvm_pl.vqgan or the config is absent."""
    try:
        from lvm_pl.vqgan.module import VQGAN  # noqa: F401
    except ImportError:
        return None
    if not config.exists():
        return None
    return vqgan_from_config(config).model.to(device).eval()


def rates(fns: dict[str, Callable[[], Any]], batch_size: int, repeats: int, device: str) -> dict[str, float]:
    """Images/s of each closure, timed alternately."""
    times = alternate(fns, warmup=1, repeats=repeats, device=device)
    return {name: batch_size / median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 px images, two repeats (CI smoke run)")
    parser.add_argument(
        "--config", default="configs/vqgan/muse_f16_8192.yaml", help="our VQGAN's YAML (its model: section)"
    )
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.quick:
        args.image_size, args.batch_size, args.repeats = 32, 1, 2
    device, size = args.device, args.image_size
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()
    images = torch.rand(args.batch_size, 3, size, size, device=device) * 2 - 1  # [B, 3, H, W]
    ids = torch.randint(0, 8192, (args.batch_size, size // 16, size // 16), device=device)  # [B, h, w]

    ref = reference_model(device)
    ours = our_model(ROOT / args.config, device)
    note = "random weights in both (no converter yet)"
    encode = {"reference": lambda: reference_encode(ref, images)}
    decode = {"reference": lambda: reference_decode(ref, ids)}
    if ours is None:
        note = f"lvm_pl.vqgan or {args.config} not landed yet: reference only"
    else:
        encode["ours"] = lambda: ours.encode(images)
        decode["ours"] = lambda: ours.decode(ids)
    with torch.inference_mode(), autocast:
        enc = rates(encode, args.batch_size, args.repeats, device)
        dec = rates(decode, args.batch_size, args.repeats, device)
    for name in enc:
        say(f"vqgan {name}: encode {enc[name]:.2f} images/s, decode {dec[name]:.2f} images/s ({size}x{size})")

    label = f"{size}x{size}, B={args.batch_size}"
    figures = [
        figure(
            f"VQGAN encode images/s ({label})", "images/s", enc.get("ours"), enc["reference"], REFERENCE, 1.0, note=note
        ),
        figure(
            f"VQGAN decode images/s ({label})", "images/s", dec.get("ours"), dec["reference"], REFERENCE, 1.0, note=note
        ),
    ]
    details = {
        "image_size": size,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "device": device,
        "config": args.config,
        "reference_config": MUSE_VQMODEL,
        "ours_measured": ours is not None,
        "encode_images_per_s": enc,
        "decode_images_per_s": dec,
        "weights": note,
    }
    write_results("bench_vqgan", figures, details)


if __name__ == "__main__":
    main()
