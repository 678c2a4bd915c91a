"""`make demo` / `python main.py demo`: the whole LVM method on the built-in data, as the plain CLI commands the README
shows: train the tiny VQGAN, tokenize, train the tiny LVM, evaluate both, prompt the LVM, print a summary.

Each stage is one `python main.py ...` command run as a subprocess. A stage that finished leaves a marker in
`runs/demo/`, so re-running skips it; an interrupted training resumes from its `last.ckpt`, an interrupted
tokenization from its complete shards.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lvm_pl import atomic
from lvm_pl.console import UserError

VQGAN_CKPT = "runs/vqgan_tiny/checkpoints/last.ckpt"
LVM_CKPT = "runs/lvm_tiny/checkpoints/last.ckpt"
VQGAN = "-c configs/vqgan/tiny.yaml -c configs/demo/data.yaml"
LVM = "-c configs/lvm/tiny.yaml -c configs/data/tokens.yaml -c configs/demo/lvm.yaml"


def tokenize(split: str) -> str:
    return (
        f"predict {VQGAN} -c configs/tokenize.yaml --ckpt_path {VQGAN_CKPT} --data.init_args.predict_split {split}"
        f" --trainer.callbacks.init_args.split {split} --trainer.callbacks.init_args.output_dir data/tokens/{split}"
    )


@dataclass(frozen=True)
class Stage:
    """One CLI command of the demo; `name` names its completion marker."""

    name: str
    title: str
    args: str


STAGES = [
    Stage(
        "vqgan_fit", "train the tiny VQGAN tokenizer", f"fit {VQGAN} --ckpt_path last --trainer.max_time 00:00:04:00"
    ),
    Stage(
        "vqgan_test",
        "evaluate the tokenizer (PSNR, SSIM, codebook usage)",
        f"test {VQGAN} --ckpt_path {VQGAN_CKPT} --trainer.limit_test_batches 10"
        " --trainer.logger.init_args.version demo",
    ),
    *[Stage(f"tokenize_{s}", f"tokenize the {s} sentences into shards", tokenize(s)) for s in ("train", "val")],
    Stage("lvm_fit", "train the tiny LVM on the token shards", f"fit {LVM} --ckpt_path last"),
    Stage(
        "lvm_test",
        "evaluate the LVM (perplexity by kind, context length, next-frame PSNR)",
        f"test -c configs/lvm/tiny.yaml -c configs/demo/lvm.yaml -c configs/evaluate.yaml"
        f" -c configs/data/builtin_eval.yaml -c configs/demo/eval.yaml --model.init_args.tokenizer {VQGAN_CKPT}"
        f" --ckpt_path {LVM_CKPT} --trainer.logger.init_args.version demo",
    ),
    Stage(
        "generate",
        "prompt the LVM with held-out sequences and analogies",
        f"predict -c configs/generate.yaml -c configs/demo/prompts.yaml --ckpt_path {LVM_CKPT}"
        f" --model.init_args.tokenizer {VQGAN_CKPT} --trainer.callbacks.init_args.output_dir runs/demo/generated",
    ),
]


def run_stage(stage: Stage, marker_dir: Path) -> float:
    """Run one stage unless its marker exists; returns the seconds it took (0 when skipped)."""
    marker = marker_dir / f"{stage.name}.done.json"
    if marker.exists():
        print(f"== {stage.title}: done before ({marker}), skipped", flush=True)
        return 0.0
    command = [sys.executable, "main.py", *shlex.split(stage.args)]
    print(f"\n== {stage.title}\n$ python main.py {stage.args}", flush=True)
    start = time.perf_counter()
    if subprocess.run(command).returncode != 0:
        raise UserError(f"demo stage '{stage.name}' failed; fix the error above and run `make demo` again to resume")
    seconds = time.perf_counter() - start
    atomic.write_json(marker, {"command": f"python main.py {stage.args}", "seconds": round(seconds, 1)})
    return seconds


def _read(path: str) -> dict:
    p = Path(path)
    return json.loads(p.read_text()) if p.exists() else {}


def summary() -> str:
    """The demo's closing summary: where everything is and the figures that say whether it worked."""
    vq = _read("runs/vqgan_tiny/demo/test_results.json")
    lvm = _read("runs/lvm_eval/demo/lvm_test_results.json")
    ctx = _read("runs/lvm_eval/demo/context_length.json")
    timings = {p.name.split(".")[0]: _read(str(p)).get("seconds", 0) for p in Path("runs/demo").glob("*.done.json")}
    lines = [
        "",
        "== lvm-pl demo summary",
        f"checkpoints : {VQGAN_CKPT} (tokenizer), {LVM_CKPT} (LVM)",
        "token shards: data/tokens/train, data/tokens/val (docs/shards.md)",
        "prompt grids: runs/demo/generated/*.png (prompt | generated | truth)",
        "TensorBoard : tensorboard --logdir runs",
        f"stage times : {', '.join(f'{k} {v:.0f}s' for k, v in sorted(timings.items()))}",
    ]
    lines.append(f"tokenizer   : {fmt(vq, ('psnr', 'ssim', 'usage', 'perplexity'))}")
    lines.append(
        f"LVM         : target-image {fmt(lvm, ('target_perplexity/all/perplexity',))} (chance = codebook size)"
    )
    rows = ctx.get("rows") or []
    if rows:
        curve = ", ".join(f"{r['context_frames']}:{r['perplexity']:.2f}" for r in rows)
        lines.append(f"context     : target perplexity by number of context frames  {curve}")
    keys = ("predicted_psnr", "copy_last_psnr", "reconstruction_psnr")
    seq = fmt(lvm, tuple(f"next_frame/sequence/{k}" for k in keys))
    lines.append(f"next frame  : sequences {seq}")
    lines += verdict(lvm, rows)
    return "\n".join(lines)


def verdict(lvm: dict, rows: list[dict]) -> list[str]:
    """The demo's quality bar, stated with its figures: next frames beat copying, perplexity falls with context."""
    seq = (lvm.get("next_frame") or {}).get("sequence") or {}
    if not seq or not rows:
        return ["quality bar : not measured (no next-frame or context results)"]
    beats = seq["predicted_psnr"] > seq["copy_last_psnr"]
    falls = rows[-1]["perplexity"] < rows[0]["perplexity"] * 0.98
    lines = [
        f"quality bar : next frames beat copy-the-last-frame: {'yes' if beats else 'NO'}"
        f" ({seq['predicted_psnr']:.2f} vs {seq['copy_last_psnr']:.2f} dB); perplexity falls with context:"
        f" {'yes' if falls else 'NO'} ({rows[0]['perplexity']:.2f} -> {rows[-1]['perplexity']:.2f})"
    ]
    if not (beats and falls):
        lines.append(
            "              not reached within the CPU budget (a prediction cannot beat the tokenizer's own"
            f" reconstruction, {seq.get('reconstruction_psnr', float('nan')):.2f} dB); see docs/demo.md"
        )
    return lines


def fmt(results: dict, keys: tuple[str, ...]) -> str:
    """`key=value` for the keys found at any depth of a results dict (missing ones are left out)."""
    flat: dict = {}

    def walk(d: dict, prefix: str = "") -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}/")
            elif isinstance(v, (int, float)):
                flat.setdefault(k, v)
                flat[f"{prefix}{k}"] = v

    walk(results)
    found = [f"{k.rsplit('/', 1)[-1]}={flat[k]:.4g}" for k in keys if k in flat]
    return ", ".join(found) if found else "(not available)"


def demo(only: list[str] | None = None) -> None:
    """Run the demo stages in order (all, or only the named ones) and print the summary.

    Args:
        only: stage names to run (vqgan_fit, vqgan_test, tokenize_train, tokenize_val, lvm_fit, lvm_test, generate).
    """
    names = [s.name for s in STAGES]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise UserError(f"demo --only: unknown stages {unknown}; known: {names}")
    if not Path("main.py").exists():
        raise UserError("run the demo from the repository root (where main.py is)")
    for stage in STAGES:
        if not only or stage.name in only:
            run_stage(stage, Path("runs/demo"))
    print(summary(), flush=True)
