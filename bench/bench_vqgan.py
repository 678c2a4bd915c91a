"""VQGAN speed: encode (images -> code ids) and decode (ids -> images) images/s, ours vs diffusers' `VQModel`.

python -m bench.bench_vqgan [--quick] [--config configs/vqgan/recipe.yaml] [--image-size 256] [--batch-size 4]

Both are the MUSE VQGAN architecture (f=16, 8192 codes; diffusers' amused `VQModel` config), timed side by side in
one process with calls alternating. Encode is everything from pixels to ids (diffusers: encoder, quant_conv, nearest
code); decode everything from ids to pixels (codebook lookup, post_quant_conv, decoder). The reference holds our
model's weights, converted by `lvm_pl.interop.diffusers_vq.to_diffusers`, and the run checks that both give the same
ids and images. Results: bench/results/bench_vqgan.json.
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

REFERENCE = "diffusers VQModel (same weights)"


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


def models(config: Path, device: str) -> tuple[nn.Module, nn.Module]:
    """Our VQGAN module from the `model:` section of `config` (seeded random weights), and diffusers' `VQModel` holding
    the same weights (converted by `lvm_pl.interop.diffusers_vq.to_diffusers`), both in eval mode on `device`."""
    from lvm_pl.interop.diffusers_vq import to_diffusers

    ours = vqgan_from_config(config).model.eval()
    return ours.to(device), to_diffusers(ours).to(device)


def rates(fns: dict[str, Callable[[], Any]], batch_size: int, repeats: int, device: str) -> dict[str, float]:
    """Images/s of each closure, timed alternately."""
    times = alternate(fns, warmup=1, repeats=repeats, device=device)
    return {name: batch_size / median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 px images, two repeats (CI smoke run)")
    parser.add_argument(
        "--config",
        default="configs/vqgan/recipe.yaml",
        help="our VQGAN YAML with a model: section (the recipe is the released architecture)",
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

    ours, ref = models(ROOT / args.config, device)
    with torch.inference_mode():
        agree = {
            "encode_ids_equal": bool(torch.equal(ours.encode(images), reference_encode(ref, images))),
            "decode_max_abs_diff": float((ours.decode(ids) - reference_decode(ref, ids).clamp(-1, 1)).abs().max()),
        }
    say(f"vqgan ours vs diffusers with the same weights: {agree}")
    note = "same weights (ours converted by lvm_pl.interop.diffusers_vq)"
    encode = {"ours": lambda: ours.encode(images), "reference": lambda: reference_encode(ref, images)}
    decode = {"ours": lambda: ours.decode(ids), "reference": lambda: reference_decode(ref, ids)}
    with torch.inference_mode(), autocast:
        enc = rates(encode, args.batch_size, args.repeats, device)
        dec = rates(decode, args.batch_size, args.repeats, device)
    for name in enc:
        say(f"vqgan {name}: encode {enc[name]:.2f} images/s, decode {dec[name]:.2f} images/s ({size}x{size})")

    label = f"{size}x{size}, B={args.batch_size}"
    figures = [
        figure(
            f"VQGAN encode images/s ({label})", "images/s", enc["ours"], enc["reference"], REFERENCE, 1.0, note=note
        ),
        figure(
            f"VQGAN decode images/s ({label})", "images/s", dec["ours"], dec["reference"], REFERENCE, 1.0, note=note
        ),
    ]
    details = {
        "image_size": size,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "device": device,
        "config": args.config,
        "reference_config": dict(ref.config),
        "encode_images_per_s": enc,
        "decode_images_per_s": dec,
        "weights": note,
        "agreement": agree,
    }
    write_results("bench_vqgan", figures, details)


if __name__ == "__main__":
    main()
