"""Reporting the LVM's evaluation: the results JSON, the context-length table and plot, TensorBoard scalars."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from lvm_pl import atomic
from lvm_pl.tensorboard import tensorboard

RESULTS_FILE = "lvm_test_results.json"
CONTEXT_FILE = "context_length"  # .csv, .json, .png
NEXT_FRAME_SCALARS = tuple(
    f"{who}_{what}"
    for what in ("psnr", "ssim", "token_accuracy", "position_error", "present")
    for who in ("predicted", "copy_last")
)


def write_results(directory: str | Path, results: dict) -> Path:
    """Write `lvm_test_results.json` (atomically) into `directory`; returns its path."""
    path = Path(directory) / RESULTS_FILE
    atomic.write_json(path, results)
    return path


def write_context_table(
    directory: str | Path, rows: list[dict], description: str, next_frame: dict | None = None
) -> list[Path]:
    """Write `context_length.{csv,json,png}` (atomically) into `directory`; returns the paths. `next_frame`: the
    results' next-frame summary, drawn beside the curve against the copy-last baseline."""
    directory = Path(directory)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    paths = [directory / f"{CONTEXT_FILE}.{ext}" for ext in ("csv", "json", "png")]
    atomic.write_text(paths[0], buf.getvalue())
    atomic.write_json(paths[1], {"frames": description, "rows": rows})
    atomic.write_bytes(paths[2], context_plot(rows, next_frame or {}))
    return paths


def context_plot(rows: list[dict], next_frame: dict | None = None) -> bytes:
    """PNG bytes of perplexity against the number of context frames and, beside it where measured, next-frame PSNR
    by kind against copying the last frame (Agg canvas: no display, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kinds = {k: s for k, s in (next_frame or {}).items() if "/" not in k and "predicted_psnr" in s}
    fig = Figure(figsize=(9.5 if kinds else 5, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2 if kinds else 1, 1)
    k = [r["context_frames"] for r in rows]
    ax.plot(k, [r["perplexity"] for r in rows], marker="o", label="codebook ids (headline)")
    ax.plot(k, [r["perplexity_plain"] for r in rows], marker=".", linestyle="--", label="whole vocabulary")
    ax.set_xlabel("context frames before the target")
    ax.set_ylabel("perplexity of the target frame")
    ax.set_title(f"context length ({rows[0]['examples']} sequences)")
    ax.grid(alpha=0.3)
    ax.legend()
    if kinds:
        bars = fig.add_subplot(1, 2, 2)
        x = range(len(kinds))
        width = 0.38
        bars.bar([i - width / 2 for i in x], [s["predicted_psnr"] for s in kinds.values()], width, label="LVM")
        copy = [s.get("copy_last_psnr", float("nan")) for s in kinds.values()]
        bars.bar([i + width / 2 for i in x], copy, width, label="copy the last frame", color="tab:gray")
        bars.set_xticks(list(x), [f"{name} ({s['examples']})" for name, s in kinds.items()])
        bars.set_xlabel("kind (greedy predictions)")
        bars.set_ylabel("next-frame PSNR (dB)")
        bars.set_title("next frame against the copy-last baseline")
        bars.grid(alpha=0.3, axis="y")
        bars.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def summary_lines(results: dict) -> list[str]:
    """A few console lines of the headline figures: target perplexity by kind, next-frame PSNR beside copying the
    last frame by kind (the families and every other figure are in the results file)."""
    perplexity = ", ".join(f"{k} {s['perplexity']:.2f}" for k, s in results["target_perplexity"].items())
    lines = [f"target perplexity (codebook ids): {perplexity}"]
    frames = [
        f"{k} {s['predicted_psnr']:.2f} dB (copy {s['copy_last_psnr']:.2f})"
        for k, s in results["next_frame"].items()
        if not k.startswith("family/") and "predicted_psnr" in s and "copy_last_psnr" in s
    ]
    if frames:
        lines.append(f"next-frame PSNR: {', '.join(frames)}")
    return lines


def scalars(results: dict) -> dict[str, float]:
    """The results' headline figures as `test/...` scalars for `self.log` (finite ones only)."""
    out = {}
    for kind, s in results["target_perplexity"].items():
        suffix = "" if kind == "all" else f"/{kind}"
        out[f"test/target_perplexity{suffix}"] = s["perplexity"]
        out[f"test/target_perplexity_plain{suffix}"] = s["perplexity_plain"]
    for kind, s in results["next_frame"].items():
        suffix = "" if kind == "all" else f"/{kind}"
        for field in NEXT_FRAME_SCALARS:
            if s.get(field) is not None:
                out[f"test/next_frame/{field}{suffix}"] = s[field]
    return {k: v for k, v in out.items() if math.isfinite(v)}


def log_context_scalars(loggers, table: list[dict]) -> None:
    """TensorBoard scalars with the number of context frames as the step (`self.log` cannot choose the step)."""
    writer = tensorboard(loggers)
    if writer is None:
        return
    for row in table:
        writer.add_scalar("test/context_length/perplexity", row["perplexity"], row["context_frames"])
        writer.add_scalar("test/context_length/perplexity_plain", row["perplexity_plain"], row["context_frames"])
    writer.flush()
