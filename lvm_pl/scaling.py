"""`python main.py demo --scaling true`: the paper's scaling trend (its Figure 3) in miniature.

Three LVM sizes (`configs/demo/scaling_{small,medium,large}.yaml`) train on the demo's token shards for the same
number of tokens (`configs/demo/scaling.yaml`); their validation loss against tokens seen (and each size's parameter
count, from its last checkpoint) goes to `runs/scaling/scaling.{csv,png}`. The tokenizer and shards are the default
demo's (its stages run first when missing).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from lvm_pl import atomic
from lvm_pl.console import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SIZES = ("small", "medium", "large")
OUT = Path("runs/scaling")
BASE = "-c configs/lvm/tiny.yaml -c configs/data/tokens.yaml -c configs/demo/lvm.yaml -c configs/demo/scaling.yaml"


def stages() -> list:
    """One `fit` per size, resumable (`--ckpt_path last`)."""
    from lvm_pl.demo import Stage

    return [
        Stage(
            f"scaling_{size}",
            f"train the {size} LVM of the scaling study",
            f"fit {BASE} -c {_config(size)} --ckpt_path last",
        )
        for size in SIZES
    ]


def _config(size: str) -> str:
    return f"configs/demo/scaling_{size}.yaml"


def tokens_per_step(files: list[str]) -> int:
    """batch_size x seq_len of the study's data, as the composed configs set them (the last file that sets one)."""
    data: dict = {}
    for name in files:
        data |= ((yaml.safe_load(Path(name).read_text()) or {}).get("data") or {}).get("init_args") or {}
    return int(data["batch_size"]) * int(data["seq_len"])


def validation_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, val/loss) of every validation of a run, over all its logger versions (a resumed run adds one)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    by_step: dict[int, float] = {}
    for version in sorted(run_dir.glob("version_*"), key=lambda p: p.stat().st_mtime):
        events = EventAccumulator(str(version), size_guidance={"scalars": 0})
        events.Reload()
        if "val/loss" in events.Tags().get("scalars", []):
            by_step |= {e.step: e.value for e in events.Scalars("val/loss")}
    return sorted(by_step.items())


def collect(root: Path = Path("runs")) -> dict[str, list[tuple[int, float]]]:
    """Per size: (tokens seen, validation loss) points."""
    per_step = tokens_per_step(["configs/demo/lvm.yaml", "configs/demo/scaling.yaml"])
    curves = {}
    for size in SIZES:
        points = validation_curve(root / f"scaling_{size}")
        if not points:
            raise UserError(f"scaling study: no val/loss logged under {root / f'scaling_{size}'}; run its stage again")
        # Lightning logs a mid-epoch validation at the count of steps before the one just trained (99 after 100)
        curves[size] = [((step + 1) * per_step, loss) for step, loss in points]
    return curves


def parameters(root: Path = Path("runs")) -> dict[str, int]:
    """Per size: the LVM's parameter count, summed over its last checkpoint's weights (read as data)."""
    from lvm_pl.safe_load import load_torch_file

    counts = {}
    for size in SIZES:
        state = load_torch_file(root / f"scaling_{size}" / "checkpoints" / "last.ckpt", mmap=True)["state_dict"]
        counts[size] = sum(t.numel() for name, t in state.items() if name.startswith("model."))
    return counts


def write(curves: dict[str, list[tuple[int, float]]], params: dict[str, int], out: Path = OUT) -> list[Path]:
    """scaling.csv (size, params, tokens, val_loss) and scaling.png (loss against tokens per size), atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["size", "params", "tokens", "val_loss"])
    writer.writerows(
        [size, params[size], tokens, f"{loss:.5f}"] for size, points in curves.items() for tokens, loss in points
    )
    paths = [out / "scaling.csv", out / "scaling.png"]
    atomic.write_text(paths[0], buf.getvalue())
    buf = io.BytesIO()
    figure(curves, params).savefig(buf, format="png")
    atomic.write_bytes(paths[1], buf.getvalue())
    return paths


def figure(curves: dict[str, list[tuple[int, float]]], params: dict[str, int]) -> Figure:
    """Validation loss against tokens seen, one line per size labelled with its parameter count (Agg, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for size, points in curves.items():
        label = f"{size} ({params[size] / 1e6:.2f}M params)"
        ax.plot([t / 1e6 for t, _ in points], [loss for _, loss in points], marker="o", markersize=3, label=label)
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("validation loss (nats per token)")
    ax.set_title("LVM sizes on the same tokens (demo shards)")
    ax.grid(alpha=0.3)
    ax.legend(title="model")
    fig.tight_layout()
    return fig


def verdict(curves: dict[str, list[tuple[int, float]]]) -> list[str]:
    """The study's summary: each size's last validation loss at the shared token count, and whether they order."""
    tokens = max(set.intersection(*({t for t, _ in points} for points in curves.values())), default=None)
    if tokens is None:
        return ["scaling     : the sizes share no validation point (runs stopped early?); see runs/scaling_*"]
    last = {size: dict(points)[tokens] for size, points in curves.items()}
    shown = ", ".join(f"{size} {loss:.3f}" for size, loss in last.items())
    ordered = all(last[a] > last[b] for a, b in zip(SIZES, SIZES[1:], strict=False))
    return [
        f"scaling     : validation loss at {tokens / 1e6:.1f}M tokens: {shown}",
        f"scaling bar : larger models reach lower loss at equal tokens: {'yes' if ordered else 'NO'}"
        f" ({OUT}/scaling.png, scaling.csv)",
    ]
