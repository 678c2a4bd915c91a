"""`make demo` / `python main.py demo`: the whole LVM method on the built-in data, as the plain CLI commands the README
shows: train the tiny VQGAN, tokenize, train the tiny LVM, evaluate both, prompt the LVM, print a summary.

Each stage is one `python main.py ...` command run as a subprocess. A stage that finished leaves a marker in
`runs/demo/`, so re-running skips it; an interrupted training resumes from its `last.ckpt`, an interrupted
tokenization from its complete shards.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lvm_pl import atomic
from lvm_pl.console import UserError


@dataclass(frozen=True)
class Stage:
    """One CLI command of the demo; `name` names its completion marker."""

    name: str
    title: str
    args: str


@dataclass(frozen=True)
class Variant:
    """Where one variant of the demo keeps its runs: the default (`make demo`, ~15 minutes on 2 CPU cores) or the
    long one (`python main.py demo --long true`: configs/demo/*_long.yaml, longer training, its own runs)."""

    name: str  # runs/<name>/ holds the markers and the prompt grids
    vqgan_config: str  # configs/demo/<..>.yaml composed over configs/vqgan/tiny.yaml
    lvm_config: str  # configs/demo/<..>.yaml composed over configs/lvm/tiny.yaml
    vqgan_run: str  # runs/<vqgan_run>/checkpoints/last.ckpt (the dirpath in vqgan_config)
    lvm_run: str
    tokens: str  # shard directory (train/, val/): configs/data/tokens.yaml's, or the one lvm_config names

    @property
    def vqgan_ckpt(self) -> str:
        return f"runs/{self.vqgan_run}/checkpoints/last.ckpt"

    @property
    def lvm_ckpt(self) -> str:
        return f"runs/{self.lvm_run}/checkpoints/last.ckpt"

    @property
    def eval_dir(self) -> str:
        return f"runs/lvm_eval/{self.name}"


DEFAULT = Variant("demo", "vqgan", "lvm", "vqgan_tiny", "lvm_tiny", "data/tokens")
LONG = Variant("demo_long", "vqgan_long", "lvm_long", "vqgan_tiny_long", "lvm_tiny_long", "data/tokens_long")


def stages(v: Variant) -> list[Stage]:
    """The demo's commands for variant `v`, in order."""
    vqgan = f"-c configs/vqgan/tiny.yaml -c configs/demo/data.yaml -c configs/demo/{v.vqgan_config}.yaml"
    lvm_demo = " ".join(f"-c configs/demo/{name}.yaml" for name in dict.fromkeys(["lvm", v.lvm_config]))

    return [
        Stage("vqgan_fit", "train the tiny VQGAN tokenizer", f"fit {vqgan} --ckpt_path last"),
        Stage(
            "vqgan_test",
            "evaluate the tokenizer (PSNR, SSIM, codebook usage)",
            f"test {vqgan} --ckpt_path {v.vqgan_ckpt} --trainer.logger.init_args.version {v.name}",
        ),
        Stage(
            "tokenize",
            "tokenize the train and val sentences into shards",
            f"tokenize {vqgan} --ckpt_path {v.vqgan_ckpt} --output_dir {v.tokens} --splits train val",
        ),
        Stage(
            "lvm_fit",
            "train the tiny LVM on the token shards",
            f"fit -c configs/lvm/tiny.yaml -c configs/data/tokens.yaml {lvm_demo} --ckpt_path last",
        ),
        Stage(
            "lvm_test",
            "evaluate the LVM (perplexity by kind, context length, next-frame PSNR)",
            f"test -c configs/lvm/tiny.yaml {lvm_demo} -c configs/evaluate.yaml -c configs/data/builtin_eval.yaml"
            " -c configs/demo/eval.yaml"
            f" --model.init_args.tokenizer {v.vqgan_ckpt} --ckpt_path {v.lvm_ckpt}"
            f" --trainer.logger.init_args.version {v.name}",
        ),
        Stage(
            "generate",
            "prompt the LVM with held-out sequences and analogies",
            f"predict -c configs/generate.yaml -c configs/demo/prompts.yaml --ckpt_path {v.lvm_ckpt}"
            f" --model.init_args.tokenizer {v.vqgan_ckpt} --trainer.callbacks.init_args.output_dir"
            f" runs/{v.name}/generated",
        ),
    ]


STAGES = stages(DEFAULT)


# the demo's worker counts are chosen for the 2-core machine it is timed on; on a larger one Lightning advises more,
# which a `make demo` user cannot act on (the same commands typed by hand still show it)
WORKER_ADVICE = [
    f"ignore:The '{loader}_dataloader' does not have many workers::lightning.pytorch.trainer.connectors.data_connector"
    for loader in ("train", "val", "test", "predict")
]


def stage_env() -> dict[str, str]:
    """The environment of a stage's subprocess: this one, with Lightning's worker advice ignored (WORKER_ADVICE)."""
    given = os.environ.get("PYTHONWARNINGS")
    return {**os.environ, "PYTHONWARNINGS": ",".join([*([given] if given else []), *WORKER_ADVICE])}


def run_stage(stage: Stage, marker_dir: Path) -> float:
    """Run one stage unless its marker exists; returns the seconds it took (0 when skipped)."""
    marker = marker_dir / f"{stage.name}.done.json"
    if marker.exists():
        print(f"== {stage.title}: done before ({marker}), skipped", flush=True)
        return 0.0
    command = [sys.executable, "main.py", *shlex.split(stage.args)]
    print(f"\n== {stage.title}\n$ python main.py {stage.args}", flush=True)
    start = time.perf_counter()
    if subprocess.run(command, env=stage_env()).returncode != 0:
        raise UserError(f"demo stage '{stage.name}' failed; fix the error above and run `make demo` again to resume")
    seconds = time.perf_counter() - start
    atomic.write_json(marker, {"command": f"python main.py {stage.args}", "seconds": round(seconds, 1)})
    return seconds


def _read(path: str) -> dict:
    p = Path(path)
    return json.loads(p.read_text()) if p.exists() else {}


def summary(v: Variant = DEFAULT) -> str:
    """The demo's closing summary: where everything is and the figures that say whether it worked."""
    vq = _read(f"runs/{v.vqgan_run}/{v.name}/test_results.json")
    lvm = _read(f"{v.eval_dir}/lvm_test_results.json")
    ctx = _read(f"{v.eval_dir}/context_length.json")
    markers = Path("runs", v.name).glob("*.done.json")
    timings = {p.name.split(".")[0]: _read(str(p)).get("seconds", 0) for p in markers}
    lines = [
        "",
        f"== lvm-pl {v.name.replace('_', ' ')} summary",
        f"checkpoints : {v.vqgan_ckpt} (tokenizer), {v.lvm_ckpt} (LVM)",
        f"token shards: {v.tokens}/train, {v.tokens}/val (docs/shards.md)",
        f"prompt grids: runs/{v.name}/generated/*.png (prompt | generated | truth)",
        f"evaluation  : {v.eval_dir}/ (lvm_test_results.json, context_length.csv/json/png)",
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
    lines += drawn(lvm.get("next_frame") or {})
    lines += verdict(lvm, rows, v)
    return "\n".join(lines)


def drawn(next_frame: dict) -> list[str]:
    """What the LVM drew, by figures a blur cannot win: moving objects' position error and presence, and every
    family's token accuracy (analogies: beside copying the query B), each beside the copy baseline."""

    def pair(d: dict, what: str, unit: str = "", scale: float = 1.0) -> str:
        got, copy, floor = (d.get(f"{name}_{what}") for name in ("predicted", "copy_last", "reconstruction"))
        digits = 0 if unit == "%" else 2
        show = lambda x: "n/a" if x is None else f"{x * scale:.{digits}f}{unit}"  # noqa: E731
        return f"{show(got)} (copy {show(copy)}" + ("" if floor is None else f", tokenizer {show(floor)}") + ")"

    lines = []
    moving = next_frame.get("family/moving")
    if moving:
        lines.append(
            f"moving      : object position error {pair(moving, 'position_error', ' px')}, presence"
            f" {pair(moving, 'present', '%', 100)}, token accuracy {pair(moving, 'token_accuracy')}"
        )
    for name, d in next_frame.items():
        if name.startswith("family/") and name != "family/moving":
            lines.append(
                f"{name[7:]:<12}: psnr {pair(d, 'psnr', ' dB')}, token accuracy {pair(d, 'token_accuracy')}"
                f" ({d['examples']} prompts)"
            )
    return lines


def verdict(lvm: dict, rows: list[dict], v: Variant = DEFAULT) -> list[str]:
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
        longer = "" if v is LONG else "; `python main.py demo --long true` trains 4x longer and reached it (~50 min)"
        lines.append(
            f"              not reached by this run (the tokenizer's own reconstruction of those frames:"
            f" {seq.get('reconstruction_psnr', float('nan')):.2f} dB){longer}; see docs/demo.md"
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


def demo(only: list[str] | None = None, long: bool = False, scaling: bool = False) -> None:
    """Run the demo stages in order (all, or only the named ones) and print the summary.

    Args:
        only: stage names to run (vqgan_fit, vqgan_test, tokenize, lvm_fit, lvm_test, generate).
        long: the long variant (configs/demo/*_long.yaml: longer training, its own runs; see docs/demo.md).
        scaling: the scaling study instead: three LVM sizes on the default demo's shards for the same number of
            tokens, validation loss against tokens in runs/scaling/ (about 30 minutes on 2 CPU cores).
    """
    if scaling:
        return scaling_study()
    v = LONG if long else DEFAULT
    todo = stages(v)
    names = [s.name for s in todo]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise UserError(f"demo --only: unknown stages {unknown}; known: {names}")
    if not Path("main.py").exists():
        raise UserError("run the demo from the repository root (where main.py is)")
    for stage in todo:
        if not only or stage.name in only:
            run_stage(stage, Path("runs", v.name))
    print(summary(v), flush=True)


def scaling_study() -> None:
    """`demo --scaling true`: the default demo's tokenizer and shards (made when missing), then the three sizes."""
    from lvm_pl import scaling

    if not Path("main.py").exists():
        raise UserError("run the demo from the repository root (where main.py is)")
    for stage in STAGES:
        if stage.name in ("vqgan_fit", "tokenize"):
            run_stage(stage, Path("runs", DEFAULT.name))
    for stage in scaling.stages():
        run_stage(stage, scaling.OUT)
    curves = scaling.collect()
    paths = scaling.write(curves, scaling.parameters())
    print(
        "\n".join(["", "== lvm-pl scaling study", f"figure      : {paths[1]} ({paths[0]})", *scaling.verdict(curves)])
    )
