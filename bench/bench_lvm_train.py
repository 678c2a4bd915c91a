"""LVM training speed: our `LLaMA` vs transformers' `LlamaForCausalLM` (sdpa), same config, weights, AdamW and batch.

python -m bench.bench_lvm_train [--quick] [--preset tiny] [--contexts 512 1024 2048 4096] [--device cuda]

Both models train side by side in one process, steps alternating, so machine noise cancels in the ratio. A step is
forward, the same cross-entropy on the logits, backward, AdamW. MFU = FLOPs per step (measured with Lightning's
`measure_flops` on a meta-device twin; equals 6N + 12·layers·T·C per token) / the rate of a square GEMM timed in the
same alternation as the steps (fp32 on CPU, bf16 on GPU), so both see the same machine load. Our model is timed
also with document masks (`doc_mask`: dense SDPA mask; flex attention on CUDA) over packed windows of 4 documents a
row, against its own causal step (`doc_mask: false`, the official recipe). The scaling part times both at each
context length, batch 1, and measures peak memory of our
model's training step in a fresh process per length (CUDA: max allocated; CPU: peak RSS growth).
Results go to bench/results/bench_lvm_train.json.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.throughput import measure_flops
from torch import nn

from bench.common import alternate, figure, gemm, median, write_results
from lvm_pl.console import say
from lvm_pl.interop.hf_llama import hf_config, to_hf_name
from lvm_pl.lvm.config import LVMConfig
from lvm_pl.lvm.model import LLaMA
from lvm_pl.tokens import TokenLayout

REFERENCE = "transformers LlamaForCausalLM (sdpa)"
# document-masked variants timed beside the causal step (CPU flex attention has no backward)
DOC_MASKS = {"cpu": ["dense", "chunked"], "cuda": ["dense", "chunked", "flex"]}
DEFAULT_DOC_MASK = {"cpu": "chunked", "cuda": "flex"}  # what `doc_mask: true` picks (LLaMA._mask_kind)
# --quick shrinks the tiny preset further, so the smoke run takes seconds
QUICK_OVERRIDES = dict(n_embd=64, n_layer=2, n_head=2, intermediate_size=172)


def hf_twin(model: LLaMA) -> nn.Module:
    """transformers' LlamaForCausalLM (sdpa) with our config and a copy of our weights, via lvm_pl.interop.hf_llama."""
    from transformers import LlamaForCausalLM

    c = model.config
    # the layout only sets config.json's bos/eos ids; any codebook that fills the vocabulary will do
    layout = TokenLayout(codebook_size=c.vocab_size - TokenLayout.num_special, tokens_per_image=1)
    hf_cfg = hf_config(c, layout)
    hf_cfg._attn_implementation = "sdpa"  # the reference the issue names, whatever transformers' default becomes
    hf_cfg.use_cache = False
    hf = LlamaForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict({to_hf_name(k): v for k, v in model.state_dict().items()}, strict=False)
    if unexpected or any("rotary_emb" not in k for k in missing):
        raise RuntimeError(f"weight mapping to LlamaForCausalLM is stale: missing={missing} unexpected={unexpected}")
    return hf.to(next(model.parameters()).device)


def flops_per_step(config: LVMConfig, batch_size: int, seq_len: int) -> float:
    """Training FLOPs (forward + backward) of one [batch_size, seq_len] step, counted on the meta device."""
    with torch.device("meta"):
        twin = LLaMA(config)
        idx = torch.zeros(batch_size, seq_len, dtype=torch.long)
        return float(measure_flops(twin, lambda: twin(idx), lambda y: y.sum()))


def formula_flops_per_token(config: LVMConfig, seq_len: int) -> float:
    """6N (matmul weights, forward + backward) + 12·layers·T·C (QK^T and AV, full square as the counter counts)."""
    c = config
    attn = c.n_embd * c.n_head * c.head_size + 2 * c.n_embd * c.n_query_groups * c.head_size + c.n_embd**2
    mlp = 3 * c.n_embd * c.intermediate_size
    n = c.n_layer * (attn + mlp) + c.n_embd * c.vocab_size
    return 6 * n + 12 * c.n_layer * seq_len * c.n_embd


def make_step(
    forward: Callable[[torch.Tensor], torch.Tensor],
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    precision: str,
) -> Callable[[], None]:
    """One training step closure: forward, cross-entropy, backward, AdamW (the LVM module's step, minus logging)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    device_type = batch["input_ids"].device.type

    def step() -> None:
        autocast = (
            torch.autocast(device_type, dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
        )
        with autocast:
            logits = forward(batch["input_ids"])  # [B, T, V]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def models_and_batch(
    config: LVMConfig, batch_size: int, seq_len: int, device: str
) -> tuple[LLaMA, nn.Module, dict[str, torch.Tensor]]:
    """Our model, its transformers twin (same weights), and one seeded random batch (one document per row)."""
    torch.manual_seed(0)
    ours = LLaMA(config).to(device).train()
    theirs = hf_twin(ours).train()
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), device=device)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "doc_ids": packed_doc_ids(batch_size, seq_len, device)}
    return ours, theirs, batch


def packed_doc_ids(batch_size: int, seq_len: int, device: str) -> torch.Tensor:
    """doc_ids [B, T] of a packed window: documents of a quarter window each (the tiny preset's 4-image sentences
    at 64 tokens per image fill 1024 tokens so), each row offset by a few tokens as the packer leaves them."""
    positions = torch.arange(seq_len, device=device)
    offsets = torch.arange(batch_size, device=device)[:, None] * 37
    return (positions[None] + offsets) // max(1, seq_len // 4)


def compare(
    config: LVMConfig,
    batch_size: int,
    seq_len: int,
    device: str,
    precision: str,
    repeats: int,
    with_docs: bool,
    peak: tuple[Callable[[], Any], float],
) -> dict[str, float]:
    """Median seconds per training step of ours (causal; and with doc_ids if asked) and the reference, and of the
    `peak` GEMM closure (its FLOPs alongside), all alternating, so the MFU denominator sees the same machine load."""
    ours, theirs, batch = models_and_batch(config, batch_size, seq_len, device)
    steps = {
        "ours": make_step(lambda idx: ours(idx), ours, batch, precision),
        "reference": make_step(lambda idx: theirs(input_ids=idx).logits, theirs, batch, precision),
        "gemm": peak[0],
    }
    for kind in DOC_MASKS[device.split(":")[0]] if with_docs else ():
        twin = LLaMA(replace(config, doc_mask=kind)).to(device).train()
        twin.load_state_dict(ours.state_dict())
        steps[f"ours_doc_mask_{kind}"] = make_step(partial(twin, doc_ids=batch["doc_ids"]), twin, batch, precision)
    times = alternate(steps, warmup=2, repeats=repeats, device=device)
    return {name: median(t) for name, t in times.items()}


def _peak_memory_child(config: LVMConfig, seq_len: int, device: str, precision: str, queue: Any) -> None:
    """In a fresh process: bytes the training step adds at its peak over the model + optimizer built beforehand."""
    torch.manual_seed(0)
    model = LLaMA(config).to(device).train()
    ids = torch.randint(0, config.vocab_size, (1, seq_len + 1), device=device)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    step = make_step(lambda idx: model(idx), model, batch, precision)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        step()  # the second step holds AdamW's state too
        queue.put(torch.cuda.max_memory_allocated(device) - base)
        return
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    base = _proc_status_kib("VmRSS")
    step()
    step()
    queue.put((_proc_status_kib("VmHWM") - base) * 1024)


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def peak_memory(config: LVMConfig, seq_len: int, device: str, precision: str) -> float:
    """Peak extra bytes of one of our training steps at batch 1 x `seq_len`, measured in a spawned process."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_memory_child, args=(config, seq_len, device, precision, queue))
    proc.start()
    result = queue.get(timeout=600)
    proc.join()
    return float(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shrunken model, short sequences (CI smoke run)")
    parser.add_argument("--preset", default="tiny", help="LVMConfig preset (CPU default tiny; GPU: 300m)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per row of the side-by-side comparison")
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096], help="scaling study")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per model (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["32", "bf16-mixed"], default=None, help="default: bf16-mixed on GPU")
    parser.add_argument(
        "--gemm-size", type=int, default=None, help="square GEMM for the peak rate (CPU 2048, GPU 8192)"
    )
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    precision = args.precision or ("bf16-mixed" if on_gpu else "32")
    overrides = QUICK_OVERRIDES if args.quick else {}
    if args.quick:
        args.batch_size, args.seq_len, args.contexts, args.repeats = 2, 64, [128], 3
    config = LVMConfig.from_name(args.preset, **{**overrides, "block_size": max(args.seq_len, *args.contexts)})

    gemm_dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    gemm_size = args.gemm_size or (512 if args.quick else 8192 if on_gpu else 2048)
    square = gemm(args.device, gemm_dtype, gemm_size)

    flops = flops_per_step(config, args.batch_size, args.seq_len)
    formula = formula_flops_per_token(config, args.seq_len) * args.batch_size * args.seq_len
    if abs(flops - formula) > 1e-6 * formula:
        raise RuntimeError(f"measured FLOPs {flops:.4g} disagree with 6N + attention {formula:.4g}")
    tokens = args.batch_size * args.seq_len
    seconds = compare(config, args.batch_size, args.seq_len, args.device, precision, args.repeats, True, square)
    peak = square[1] / seconds.pop("gemm")
    say(f"peak {gemm_dtype} GEMM ({gemm_size}^2, beside the steps): {peak / 1e9:.1f} GFLOP/s")
    rate = {name: tokens / s for name, s in seconds.items()}
    mfu = {name: flops / s / peak for name, s in seconds.items()}
    for name in seconds:
        say(f"train {name}: {rate[name]:.0f} tokens/s, MFU {mfu[name]:.1%}")

    scaling = []
    for ctx_len in args.contexts:
        s = compare(config, 1, ctx_len, args.device, precision, args.repeats, False, square)
        mem = peak_memory(config, ctx_len, args.device, precision)
        row = {
            "context": ctx_len,
            "ours_tokens_per_s": ctx_len / s["ours"],
            "reference_tokens_per_s": ctx_len / s["reference"],
            "ours_mfu": flops_per_step(config, 1, ctx_len) / s["ours"] / (square[1] / s["gemm"]),
            "peak_gemm_flops": square[1] / s["gemm"],
            "ours_peak_memory_mib": mem / 2**20,
        }
        scaling.append(row)
        say(
            f"context {ctx_len}: ours {row['ours_tokens_per_s']:.0f} tokens/s, reference"
            f" {row['reference_tokens_per_s']:.0f}, peak step memory {row['ours_peak_memory_mib']:.0f} MiB"
        )

    shown = "fp32" if precision == "32" else precision
    size = f"{args.preset}{' (shrunk)' if overrides else ''}, B={args.batch_size}, T={args.seq_len}, {shown}"
    figures = [
        figure(f"LVM train tokens/s ({size})", "tokens/s", rate["ours"], rate["reference"], REFERENCE, aim_ratio=1.0),
        *(
            figure(
                f"LVM train tokens/s, document mask {name.removeprefix('ours_doc_mask_')} (4 documents per row)",
                "tokens/s",
                rate[name],
                rate["ours"],
                "ours, causal across documents (doc_mask: false)",
                # the aim is for the kind `doc_mask: true` picks here; the others are shown beside it
                aim_ratio=0.95 if name == f"ours_doc_mask_{DEFAULT_DOC_MASK[args.device.split(':')[0]]}" else None,
            )
            for name in rate
            if name.startswith("ours_doc_mask_")
        ),
        figure("LVM train MFU", "fraction", mfu["ours"], mfu["reference"], REFERENCE),
    ]
    for row in scaling:
        figures.append(
            figure(
                f"LVM train tokens/s, context {row['context']} (B=1)",
                "tokens/s",
                row["ours_tokens_per_s"],
                row["reference_tokens_per_s"],
                REFERENCE,
                note=f"peak step memory {row['ours_peak_memory_mib']:.0f} MiB",
            )
        )
    details = {
        "config": config.to_dict(),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "device": args.device,
        "precision": precision,
        "repeats": args.repeats,
        "peak_gemm_flops": peak,
        "gemm": {"size": gemm_size, "dtype": str(gemm_dtype)},
        "flops_per_step": flops,
        "seconds_per_step": seconds,
        "tokens_per_s": rate,
        "mfu": mfu,
        "scaling": scaling,
        "memory_kind": "cuda max_memory_allocated growth" if on_gpu else "peak RSS growth (VmHWM - VmRSS before)",
    }
    write_results("bench_lvm_train", figures, details)


if __name__ == "__main__":
    main()
