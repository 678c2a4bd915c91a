"""Visual-prompt generation speed: our KV-cache loop vs transformers' `generate` (same weights) vs a loop without cache.

python -m bench.bench_generate [--quick] [--preset tiny] [--batch-size 1] [--prompt-frames 1] [--frames 1]
                               [--sweep 1 15] [--compile] [--device cuda] [--threads 1]

Every method generates the same greedy tokens (checked: special ids suppressed in all three) for `--batch-size`
prompts of `--prompt-frames` random images, `--frames` images each; tokens/s counts generated tokens over the whole
call (one prefill + one token per step). transformers runs `LlamaForCausalLM.generate` (sdpa, its default cache) on
weights converted by `lvm_pl.interop.hf_llama`. The sweep times one generated image after prompts of 1..15 frames
(ours, compiled too with --compile, and transformers). Results go to bench/results/bench_generate.json.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

from bench.common import alternate, figure, median, write_results
from lvm_pl.console import say
from lvm_pl.interop.hf_llama import hf_config, to_hf_name
from lvm_pl.lvm.config import LVMConfig
from lvm_pl.lvm.generation import GenerationSettings, generate, generate_no_cache, with_bos
from lvm_pl.lvm.model import LLaMA
from lvm_pl.tokens import TokenLayout

REFERENCE = "transformers LlamaForCausalLM.generate (sdpa)"
# --quick: a shrunken tiny model and 4x4-token images, so the smoke run takes seconds
QUICK_OVERRIDES = dict(n_embd=64, n_layer=2, n_head=2, intermediate_size=172)


def hf_twin(model: LLaMA, layout: TokenLayout) -> nn.Module:
    """transformers' LlamaForCausalLM (sdpa, cache on) holding our weights, converted by lvm_pl.interop.hf_llama."""
    from transformers import LlamaForCausalLM

    cfg = hf_config(model.config, layout)
    cfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(cfg).to(model.embed_tokens.weight.device).eval()
    missing, unexpected = hf.load_state_dict({to_hf_name(k): v for k, v in model.state_dict().items()}, strict=False)
    if unexpected or any("rotary_emb" not in k for k in missing):
        raise RuntimeError(f"weight conversion mismatch: missing {missing}, unexpected {unexpected}")
    return hf


def hf_generate(hf: nn.Module, layout: TokenLayout, prompt: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Greedy `generate` of `num_frames` images with special ids suppressed: [B, N, tpi] -> [B, num_frames, tpi]."""
    context = with_bos(prompt, layout)
    new = num_frames * layout.tokens_per_image
    out = hf.generate(
        input_ids=context,
        attention_mask=torch.ones_like(context),
        max_new_tokens=new,
        do_sample=False,
        suppress_tokens=list(range(layout.codebook_size, layout.vocab_size)),
        pad_token_id=layout.eos_id,
    )
    return out[:, -new:].view(prompt.shape[0], num_frames, -1)


def methods(
    model: LLaMA, hf: nn.Module, layout: TokenLayout, prompt: torch.Tensor, frames: int, compiled: bool, no_cache: bool
) -> dict[str, Callable[[], torch.Tensor]]:
    """The generation closures to time, by name."""
    greedy = GenerationSettings(temperature=0)
    fns = {
        "ours": lambda: generate(model, prompt, frames, layout, greedy),
        "reference": lambda: hf_generate(hf, layout, prompt, frames),
    }
    if compiled:
        fns["ours_compiled"] = lambda: generate(model, prompt, frames, layout, GenerationSettings(0, compile=True))
    if no_cache:
        fns["no_cache"] = lambda: generate_no_cache(model, prompt, frames, layout, greedy)
    return fns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shrunken model, tiny images (CI smoke run)")
    parser.add_argument("--preset", default="tiny", help="LVMConfig preset (CPU: tiny; GPU: 300m)")
    parser.add_argument("--tokens-per-image", type=int, default=256, help="16x16 tokens: a 256 px image at f=16")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prompt-frames", type=int, default=1)
    parser.add_argument("--frames", type=int, default=1, help="images generated per prompt")
    parser.add_argument("--sweep", type=int, nargs=2, default=[1, 15], help="prompt lengths (frames) to sweep")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd decode step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads: one token per step is too small to split, and on a shared"
        " machine OpenMP threads that wait on each other make every small matmul ~100x slower",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.tokens_per_image, args.sweep, args.repeats = 16, [1, 3], 1
    tpi = args.tokens_per_image
    layout = TokenLayout(codebook_size=8192, tokens_per_image=tpi)
    block = 1 + (max(args.sweep[1], args.prompt_frames) + args.frames) * tpi
    overrides = {**(QUICK_OVERRIDES if args.quick else {}), "vocab_size": layout.vocab_size, "block_size": block}
    config = LVMConfig.from_name(args.preset, **overrides)
    torch.manual_seed(0)
    model = LLaMA(config).to(args.device).eval()
    hf = hf_twin(model, layout)
    prompt = torch.randint(0, layout.codebook_size, (args.batch_size, args.prompt_frames, tpi), device=args.device)

    fns = methods(model, hf, layout, prompt, args.frames, args.compile, no_cache=True)
    outputs = {name: fn() for name, fn in fns.items()}  # warm-up (and compile) + the equality check
    agree = {name: bool(torch.equal(out, outputs["ours"])) for name, out in outputs.items()}
    seconds = {k: median(v) for k, v in alternate(fns, warmup=0, repeats=args.repeats, device=args.device).items()}
    generated = args.batch_size * args.frames * tpi
    rate = {name: generated / s for name, s in seconds.items()}
    for name in rate:
        say(f"generate {name}: {rate[name]:.0f} tokens/s (same tokens as ours: {agree[name]})")

    sweep = []
    for frames in range(args.sweep[0], args.sweep[1] + 1):
        p = torch.randint(0, layout.codebook_size, (1, frames, tpi), device=args.device)
        fs = methods(model, hf, layout, p, 1, args.compile, no_cache=False)
        t = {k: median(v) for k, v in alternate(fs, warmup=1, repeats=args.repeats, device=args.device).items()}
        sweep.append({"prompt_frames": frames, **{f"{k}_seconds_per_image": v for k, v in t.items()}})
        say(f"prompt {frames} frames: " + ", ".join(f"{k} {v:.3f}" for k, v in t.items()) + " s/image")

    size = f"{args.preset}{' (shrunk)' if args.quick else ''}, B={args.batch_size}, {tpi} tokens/image"
    figures = [
        figure(f"generate tokens/s ({size})", "tokens/s", rate["ours"], rate["reference"], REFERENCE, aim_ratio=1.3),
        figure("generate tokens/s vs no KV cache", "tokens/s", rate["ours"], rate["no_cache"], "no cache", 10.0),
    ]
    if args.compile:
        figures.append(figure("generate tokens/s, compiled step", "tokens/s", rate["ours_compiled"], rate["reference"]))
    for row in sweep:
        figures.append(
            figure(
                f"seconds per generated image, prompt {row['prompt_frames']} frames",
                "s",
                row["ours_seconds_per_image"],
                row["reference_seconds_per_image"],
                REFERENCE,
            )
        )
    details = {
        "config": config.to_dict(),
        "layout": layout.to_dict(),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "prompt_frames": args.prompt_frames,
        "frames": args.frames,
        "repeats": args.repeats,
        "seconds": seconds,
        "tokens_per_s": rate,
        "same_tokens_as_ours": agree,
        "sweep": sweep,
    }
    write_results("bench_generate", figures, details)


if __name__ == "__main__":
    main()
