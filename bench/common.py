"""Shared benchmark helpers: timing (warmup, repeats, median), side-by-side alternation, a square GEMM to time
beside the work (the measured peak rate MFU divides by), the machine/date/versions header, and the common results
schema every `bench_*.py` writes.

Results schema (one JSON per script, `bench/results/<script>.json`): `{"header": {...}, "figures": [figure, ...],
"details": {...}}`, where a figure is the dict `figure()` builds (`name`, `unit`, `ours` required; the rest optional);
`python -m bench` turns figures into table rows. `BENCH_RESULTS_DIR` moves the results folder.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lvm_pl.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]
# tests point this elsewhere, so a quick smoke run never overwrites the real results
RESULTS_DIR = Path(os.environ.get("BENCH_RESULTS_DIR", ROOT / "bench" / "results"))
VERSIONED = ("torch", "lightning", "transformers", "diffusers", "deepspeed", "numpy")


def vqgan_from_config(config: Path, seed: int = 0) -> Any:
    """The Trainer CLI (not run) for a VQGAN YAML: `.model` is our VQGAN with seeded random weights, built and recorded
    in its hyper-parameters exactly as `main.py fit` builds it, so `.trainer` can save a checkpoint the CLI loads."""
    from main import cli

    torch.manual_seed(seed)
    args = ["-c", str(config), "--trainer.logger=false", "--trainer.accelerator=cpu"]
    with warnings.catch_warnings():  # the script's own sys.argv (its flags) is not meant for this CLI
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return cli([*args, "--data=lightning.pytorch.LightningDataModule"], run=False)  # a VQGAN config has no data


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels, so wall-clock time covers the work (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    """Seconds one call of `fn` takes, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def alternate(
    fns: dict[str, Callable[[], Any]], warmup: int, repeats: int, device: torch.device | str = "cpu"
) -> dict[str, list[float]]:
    """Seconds per call of each of `fns`, interleaved round by round (order rotating), so noise hits all alike."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(time_once(fns[name], device))
    return times


def median(values: list[float]) -> float:
    """Median of the repeats (robust to the odd preempted run on a shared machine)."""
    return statistics.median(values)


def gemm(device: torch.device | str, dtype: torch.dtype, size: int) -> tuple[Callable[[], Any], float]:
    """A square `size` matmul closure in `dtype` on `device`, and its FLOPs: time it beside the work it normalizes."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return (lambda: a @ b), 2.0 * size**3


def figure(
    name: str,
    unit: str,
    ours: float | None,
    reference: float | None = None,
    reference_name: str | None = None,
    aim_ratio: float | None = None,
    aim_min: float | None = None,
    note: str = "",
) -> dict[str, Any]:
    """One table row: our value, the reference's (same run), and the aim, as a ratio ours/reference or an absolute."""
    return {
        "name": name,
        "unit": unit,
        "ours": ours,
        "reference": reference,
        "reference_name": reference_name,
        "aim_ratio": aim_ratio,
        "aim_min": aim_min,
        "note": note,
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def header() -> dict[str, Any]:
    """Machine, date and versions, so a figure is never read without knowing where it came from."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": gpu,
        },
        "python": platform.python_version(),
        "versions": {**{p: _version(p) for p in VERSIONED}, "torch": torch.__version__, "cuda": torch.version.cuda},
        "git_commit": _git_commit(),
    }


def write_results(script: str, figures: list[dict[str, Any]], details: dict[str, Any]) -> Path:
    """Write `bench/results/<script>.json` atomically in the common schema; returns its path."""
    path = RESULTS_DIR / f"{script}.json"
    write_json(path, {"header": header(), "figures": figures, "details": details})
    return path
