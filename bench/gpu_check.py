"""The one-GPU check: the paper-size paths a CPU cannot measure, as one command (`bench/gpu_check.sh`, < 8 min on
an H100/H200), writing bench/results/gpu_check.json and gpu_check.md.

python -m bench.gpu_check [--dry-run] [--out DIR]

Parts (each prints PASS/FAIL/ERROR with its figure, SKIP with its reason; one that fails does not stop the others):
  fit_<strategy>  300m preset, 4096-token windows, bf16-mixed: a short `fit` through main.py with the recipe, 300m
                  and configs/trainer/<strategy>.yaml on token shards made here (DDP, ZeRO-2, ZeRO-3, ZeRO-3 + offload):
                  tokens/s, MFU, peak memory.
  convert_zero    the ZeRO-3 run's checkpoint through `main.py convert-zero`: every weight of the model, finite.
  attention       training step tokens/s: causal (doc_mask false) vs document masks (dense SDPA, flex attention).
  generate        bench/bench_generate.py at 300m: tokens/s vs transformers' `generate` (15-frame prompt).
  vqgan           bench/bench_vqgan.py at batch 32, bf16: encode/decode images/s vs diffusers' VQModel.
`--dry-run` walks every part on the CPU at tiny sizes (a test runs it), so the script cannot rot before a GPU arrives;
there the DeepSpeed fits only parse their command line (Lightning runs DeepSpeed on CUDA only) and convert_zero skips.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback

from bench.common import ROOT, gemm, header
from lvm_pl.atomic import write_json, write_text
from lvm_pl.batches import batch_tokens
from lvm_pl.console import say

STRATEGIES = ("ddp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload")
REAL = dict(preset="300m", seq_len=4096, batch_size=4, steps=12, codebook=8192, tokens_per_image=256, sentences=240)
DRY = dict(preset="tiny", seq_len=128, batch_size=2, steps=3, codebook=64, tokens_per_image=16, sentences=24)
VQGAN = ["--config", "configs/vqgan/recipe.yaml"]  # the released tokenizer (muse_f16_8192.yaml: a delta)
DRY_MODEL = "{n_layer: 1, n_embd: 32, n_head: 2, intermediate_size: 64, block_size: 128, doc_mask: true}"


class Skip(Exception):
    """A part that cannot run here (dry run on the CPU), with the reason."""


class FitProbe(Callback):
    """Times the training steps after `warmup` and writes tokens/s, MFU and peak memory to `out` (JSON); saves the
    final checkpoint to `checkpoint` when given (a directory under DeepSpeed, for convert-zero)."""

    def __init__(self, out: str, checkpoint: str | None = None, warmup: int = 2) -> None:
        self.out, self.checkpoint, self.warmup = out, checkpoint, warmup
        self.times: list[float] = []
        self.tokens = 0
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _sync(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync(pl_module.device)
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._start)
            self.tokens = batch_tokens(batch) * trainer.world_size

    def on_train_end(self, trainer, pl_module) -> None:
        from lightning.fabric.utilities.throughput import get_available_flops

        step = float(np.median(self.times)) if self.times else float("nan")
        device = pl_module.device
        peak = get_available_flops(device, torch.bfloat16) if device.type == "cuda" else None
        flops = pl_module.flops_per_batch
        result = {
            "tokens_per_s": self.tokens / step,
            "mfu": flops / step / peak if peak and flops else None,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "timed_steps": len(self.times),
        }
        if self.checkpoint:
            trainer.save_checkpoint(self.checkpoint)
        if trainer.is_global_zero:
            write_json(Path(self.out), result)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_shards(work: Path, size: dict) -> Path:
    """Random-token shards (train) in the layout the preset's vocabulary expects (codebook + 100 special ids)."""
    from lvm_pl.shards import write_split
    from lvm_pl.tokens import TokenLayout

    layout = TokenLayout(codebook_size=size["codebook"], tokens_per_image=size["tokens_per_image"])
    rng = np.random.default_rng(0)
    frames = size["seq_len"] // size["tokens_per_image"] - 1  # a sentence about a window long
    shape = (frames, layout.tokens_per_image)
    sentences = [rng.integers(0, layout.codebook_size, shape) for _ in range(size["sentences"])]
    write_split(work / "shards", "train", layout, sentences)
    return work / "shards"


def fit(strategy: str, work: Path, size: dict, dry: bool, checkpoint: Path | None = None) -> dict:
    """A short fit through the real CLI and configs; returns the probe's figures."""
    out = work / f"fit_{strategy}.json"
    configs = ["lvm/recipe.yaml", "lvm/300m.yaml", f"trainer/{strategy}.yaml", "data/tokens.yaml"]  # its usage line
    argv = [sys.executable, str(ROOT / "main.py"), "fit"]
    argv += [a for c in configs for a in ("-c", str(ROOT / "configs" / c))]
    argv += [f"--data.init_args.train={work / 'shards'}", "--data.init_args.val=null", "--data.init_args.num_workers=0"]
    argv += [f"--data.init_args.seq_len={size['seq_len']}", f"--data.init_args.batch_size={size['batch_size']}"]
    argv += ["--data.init_args.verify=size", f"--trainer.max_steps={size['steps'] + 2}"]
    argv += ["--trainer.limit_val_batches=0"]
    argv += ["--trainer.devices=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    argv += ["--trainer.callbacks+=bench.gpu_check.FitProbe", f"--trainer.callbacks.out={out}"]
    if checkpoint is not None:
        argv += [f"--trainer.callbacks.checkpoint={checkpoint}"]
    if dry:
        argv += ["--trainer.accelerator=cpu", "--trainer.precision=bf16-mixed", "--model.init_args.preset=tiny"]
        argv += [f"--model.init_args.overrides={DRY_MODEL}"]
        if "deepspeed" in strategy:
            _run([*argv, "--print_config"], work)
            raise Skip("Lightning's DeepSpeed strategy runs on CUDA only; its command line parsed (--print_config)")
    _run(argv, work)
    return json.loads(out.read_text())


def _run(argv: list[str], cwd: Path) -> None:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        raise RuntimeError(f"{' '.join(argv[1:4])} ... exit {done.returncode}:\n" + "\n".join(tail))


def fit_part(strategy: str, checkpoint: bool = False) -> Callable[[Path, dict, bool], tuple[bool, dict]]:
    def part(work: Path, size: dict, dry: bool) -> tuple[bool, dict]:
        got = fit(strategy, work, size, dry, work / "zero3.ckpt" if checkpoint else None)
        ok = got["tokens_per_s"] > 0 and (dry or (got["mfu"] or 0) > 0.05)
        return ok, got

    return part


def convert_zero_part(work: Path, size: dict, dry: bool) -> tuple[bool, dict]:
    """The ZeRO-3 checkpoint consolidated by `main.py convert-zero`: every weight of the model its hyper-parameters
    rebuild (same names and shapes), all finite."""
    from lvm_pl.lvm.config import LVMConfig
    from lvm_pl.lvm.model import LLaMA
    from lvm_pl.tokens import TokenLayout

    source = work / "zero3.ckpt"
    if dry:
        raise Skip("no ZeRO-3 checkpoint without CUDA (tests/lvm_pl/interop/test_interop_zero.py converts the layout)")
    if not source.exists():
        raise RuntimeError("no ZeRO-3 checkpoint: the fit_deepspeed_zero3 part did not write one")
    target = work / "zero3_fp32.ckpt"
    _run([sys.executable, str(ROOT / "main.py"), "convert-zero", f"--checkpoint_dir={source}", f"--out={target}"], work)
    checkpoint = torch.load(target, map_location="cpu", weights_only=True)
    hp = checkpoint["hyper_parameters"]
    vocab = TokenLayout.from_dict(hp["layout"]).vocab_size
    with torch.device("meta"):
        model = LLaMA(LVMConfig.from_name(hp["preset"], **{**(hp["overrides"] or {}), "vocab_size": vocab}))
    expected = {f"model.{k}": tuple(v.shape) for k, v in model.state_dict().items()}
    state = checkpoint["state_dict"]
    same = {k: tuple(v.shape) for k, v in state.items()} == expected
    finite = all(bool(torch.isfinite(v).all()) for v in state.values())
    params = sum(v.numel() for v in state.values())
    return same and finite, {"parameters": params, "names_and_shapes_match": same, "all_finite": finite}


def attention_part(work: Path, size: dict, dry: bool) -> tuple[bool, dict]:
    """Causal vs document-masked training steps, interleaved (bench/bench_lvm_train.py's comparison)."""
    from bench.bench_lvm_train import QUICK_OVERRIDES, compare
    from lvm_pl.lvm.config import LVMConfig

    device = "cpu" if dry else "cuda"
    overrides = QUICK_OVERRIDES if dry else {}
    config = LVMConfig.from_name(size["preset"], **overrides, block_size=size["seq_len"])
    square = gemm(device, torch.bfloat16, 512 if dry else 8192)
    seconds = compare(config, 1, size["seq_len"], device, "bf16-mixed", 3 if dry else 5, True, square)
    tokens = {name: size["seq_len"] / s for name, s in seconds.items() if name.startswith("ours")}
    best = max(v for k, v in tokens.items() if k.startswith("ours_doc_mask_"))
    return best >= 0.95 * tokens["ours"], {"tokens_per_s": tokens, "best_doc_mask_vs_causal": best / tokens["ours"]}


def bench_part(script: str, flags: list[str], dry_flags: list[str]) -> Callable[[Path, dict, bool], tuple[bool, dict]]:
    def part(work: Path, size: dict, dry: bool) -> tuple[bool, dict]:
        results = work / "results"
        argv = [sys.executable, "-m", f"bench.{script}", *(dry_flags if dry else flags)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_RESULTS_DIR": str(results)}
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"bench.{script} exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
        figures = json.loads((results / f"{script}.json").read_text())["figures"]
        ratios = {f["name"]: f["ours"] / f["reference"] for f in figures if f.get("reference")}
        aims = [ratios[f["name"]] >= f["aim_ratio"] for f in figures if f.get("reference") and f.get("aim_ratio")]
        return all(aims), {"ratios_vs_reference": ratios, "figures": figures}

    return part


PARTS: dict[str, Callable[[Path, dict, bool], tuple[bool, dict]]] = {
    "fit_ddp": fit_part("ddp"),
    "fit_deepspeed_zero2": fit_part("deepspeed_zero2"),
    "fit_deepspeed_zero3": fit_part("deepspeed_zero3", checkpoint=True),
    "fit_deepspeed_zero3_offload": fit_part("deepspeed_zero3_offload"),
    "convert_zero": convert_zero_part,
    "attention": attention_part,
    "generate": bench_part(
        "bench_generate",
        ["--preset", "300m", "--sweep", "15", "15", "--compile", "--repeats", "2"],
        ["--quick", "--sweep", "1", "2"],
    ),
    "vqgan": bench_part("bench_vqgan", [*VQGAN, "--batch-size", "32", "--repeats", "3"], [*VQGAN, "--quick"]),
}


def summary(name: str, got: dict) -> str:
    """One short figure for the PASS/FAIL line."""
    if "tokens_per_s" in got and isinstance(got["tokens_per_s"], float):
        mfu = f", MFU {got['mfu']:.1%}" if got.get("mfu") else ""
        mem = f", peak {got['peak_memory_gib']:.1f} GiB" if got.get("peak_memory_gib") else ""
        return f"{got['tokens_per_s']:.0f} tokens/s{mfu}{mem}"
    if "best_doc_mask_vs_causal" in got:
        named = {k.removeprefix("ours").lstrip("_") or "causal": v for k, v in got["tokens_per_s"].items()}
        rates = ", ".join(f"{k} {v:.0f}" for k, v in named.items())
        return f"tokens/s {rates}; best document mask {got['best_doc_mask_vs_causal']:.2f}x causal"
    if "ratios_vs_reference" in got:
        return "; ".join(f"{k}: {v:.2f}x" for k, v in list(got["ratios_vs_reference"].items())[:3])
    return ", ".join(f"{k} {v}" for k, v in got.items())


def markdown(rows: list[dict[str, Any]], head: dict) -> str:
    machine = head["machine"]
    gpu, torch_version = machine["gpu"] or "none", head["versions"]["torch"]
    lines = [f"GPU check, {head['date_utc']} UTC, GPU {gpu}, torch {torch_version}", ""]
    lines += ["| part | result | figure | seconds |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['part']} | {r['status']} | {r['figure']} | {r['seconds']:.0f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: walk every part")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the JSON and table go")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a new temporary one)")
    args = parser.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        say("error: no CUDA device visible; run with --dry-run on a CPU")
        return 2
    size = DRY if dry else REAL
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    make_shards(work, size)
    rows = []
    for name, part in PARTS.items():
        start = time.time()
        try:
            ok, got = part(work, size, dry)
            status = "PASS" if ok else "FAIL"
            shown = summary(name, got)
        except Skip as reason:
            status, got, shown = "SKIP", {"reason": str(reason)}, str(reason)
        except Exception as err:  # a part that fails must not stop the others: report it and go on
            status, got, shown = "ERROR", {"error": traceback.format_exc()}, str(err).splitlines()[0]
        rows.append({"part": name, "status": status, "figure": shown, "seconds": time.time() - start, "details": got})
        say(f"{status} {name}: {shown} ({rows[-1]['seconds']:.0f} s)")
    head = header()
    write_json(args.out / "gpu_check.json", {"header": head, "dry_run": dry, "size": size, "parts": rows})
    write_text(args.out / "gpu_check.md", markdown(rows, head))
    say(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")
    return 0 if all(r["status"] in ("PASS", "SKIP" if dry else "PASS") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
