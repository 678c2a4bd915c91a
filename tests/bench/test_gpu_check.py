"""bench/gpu_check.sh --dry-run walks every part of the one-GPU check on the CPU at tiny sizes, so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_check import PARTS

ROOT = Path(__file__).resolve().parents[2]
DEEPSPEED_PARTS = ("fit_deepspeed_zero2", "fit_deepspeed_zero3", "fit_deepspeed_zero3_offload")  # CUDA only


@pytest.mark.slow
def test_gpu_check_dry_run_walks_every_part(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        [str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = {row["part"]: row for row in report["parts"]}
    assert list(parts) == list(PARTS)
    errors = {name: row["details"]["error"] for name, row in parts.items() if row["status"] == "ERROR"}
    printed = done.stdout + done.stderr  # the lines go through lvm_pl.console.say (stderr)
    assert not errors, f"{errors}\n{printed[-3000:]}"
    for name, row in parts.items():
        assert f"{row['status']} {name}: " in printed
    assert parts["fit_ddp"]["status"] == "PASS" and parts["attention"]["status"] in ("PASS", "FAIL")
    assert {name for name, row in parts.items() if row["status"] == "SKIP"} <= {*DEEPSPEED_PARTS, "convert_zero"}
    assert "| fit_deepspeed_zero3_offload |" in (tmp_path / "gpu_check.md").read_text()
