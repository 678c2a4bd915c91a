"""`python main.py tokenize` in work units: processes sharing one output dir, killed midway and finished by another,
write the bytes one uninterrupted process writes; stale claims are taken over, live ones left; done dirs untouched."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

UNITS = {"train": 16, "val": 3}  # one sentence a unit
SMALL = [
    "--data.init_args.image_size=16",
    "--data.init_args.num_workers=0",
    "--data.init_args.batch_size=1",
    "--data.init_args.max_images=2",
    f"--data.init_args.source.init_args.splits={{train: {UNITS['train']}, val: {UNITS['val']}, test: 0}}",
    "--sentences_per_unit",
    "1",
]


@pytest.fixture(scope="module")
def command(repo_root, tiny_assets):
    """The argv of `python main.py tokenize` of the tiny VQGAN on tiny built-in data into `out`, for `splits`."""

    def argv(out, *splits: str) -> list[str]:
        cfg = [a for name in ("vqgan/tiny.yaml", "data/builtin.yaml") for a in ("-c", repo_root / "configs" / name)]
        ckpt = tiny_assets["vqgan_ckpt"]
        return ["tokenize", *cfg, "--ckpt_path", ckpt, *SMALL, "--output_dir", out, "--splits", *splits]

    return argv


@pytest.fixture(scope="module")
def reference(command, main_py, tmp_path_factory):
    """The output of one uninterrupted process."""
    out = tmp_path_factory.mktemp("reference") / "tokens"
    done = main_py(command(out, "train", "val"))
    assert done.returncode == 0, done.stderr
    return out


def files(directory) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_two_processes_killed_midway_then_one_finishes_as_one_process_would(command, reference, warm_cli, tmp_path):
    out = tmp_path / "tokens"
    runs = [warm_cli.start(command(out, "train")) for _ in range(2)]
    owners, deadline = set(), time.monotonic() + 120
    # both at work, and at least one unit written: then both die at once, without any cleanup
    while not ({r.pid for r in runs} <= owners and list(out.glob("train/*.idx.npz"))):
        assert time.monotonic() < deadline, "the two tokenize processes never worked side by side"
        for claim in out.glob("train/*.claim"):
            with contextlib.suppress(OSError, ValueError, KeyError):  # released or half-written meanwhile
                owners.add(json.loads(claim.read_text())["pid"])
        time.sleep(0.005)
    for r in runs:
        os.kill(r.pid, signal.SIGKILL)
    assert [warm_cli.wait(r).returncode for r in runs] == [-9, -9]
    assert 0 < len(list(out.glob("train/*.idx.npz"))) < UNITS["train"], "killed midway"
    assert not (out / "train" / "manifest.json").exists()

    finish = warm_cli.run(command(out, "train"))
    assert finish.returncode == 0, finish.stderr
    assert files(out / "train") == files(reference / "train")  # no claim or temp file left; the rest byte for byte


def test_stale_claims_are_taken_over_and_a_live_one_is_left(command, reference, main_py, tmp_path):
    out = tmp_path / "tokens"
    (out / "val").mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is now free: the claim of a process killed on this host
    claims = {
        "val-000000": {"host": socket.gethostname(), "pid": dead.pid, "time": time.time()},
        "val-000001": {"host": "elsewhere", "pid": 1, "time": time.time() - 7200},
        "val-000002": {"host": "elsewhere", "pid": 1, "time": time.time()},
    }
    for unit, owner in claims.items():
        (out / "val" / f"{unit}.claim").write_text(json.dumps(owner))
    old = time.time() - 7200  # untouched for 2 h: past lease_s (configs/tokenize.yaml: 1800)
    os.utime(out / "val" / "val-000001.claim", (old, old))

    first = main_py(command(out, "val"))
    assert first.returncode == 0, first.stderr
    said = first.stdout + first.stderr
    assert f"taking over the claim of dead process {dead.pid}" in said
    assert re.search(r"taking over the claim of host elsewhere, pid 1, untouched for 72\d\d s \(lease_s=1800\)", said)
    assert "1 of 3 units" in said and "left to other processes" in said
    assert sorted(p.name for p in (out / "val").iterdir()) == [
        *(f"val-00000{i}.{ext}" for i in (0, 1) for ext in ("bin", "idx.npz")),
        "val-000002.claim",  # a live claim of another host: its unit is left to it
    ]

    os.utime(out / "val" / "val-000002.claim", (old, old))  # its owner went silent
    second = main_py(command(out, "val"))
    assert second.returncode == 0, second.stderr
    assert files(out / "val") == files(reference / "val")


def test_a_finished_output_dir_is_left_untouched(command, reference, main_py, tmp_path):
    out = tmp_path / "tokens"
    shutil.copytree(reference, out)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    again = main_py(command(out, "val"))
    assert again.returncode == 0, again.stderr
    assert "3 of 3 units" in again.stdout + again.stderr
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()} == before
