"""Claims on work units: processes racing over one directory take each unit exactly once; stale claims go."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import time

from lvm_pl.claims import Claims

UNITS = [f"train-{i:06d}" for i in range(300)]


def _take_all(directory, queue) -> None:
    """What a tokenize process does per unit: claim, write its shard's index (the done marker), release."""
    claims = Claims(directory, lease_s=60)
    taken = []
    for unit in UNITS:
        if claims.claim(unit):
            taken.append(unit)
            (directory / f"{unit}.idx.npz").write_bytes(b"done")
            claims.release(unit)
    queue.put(taken)


def test_racing_processes_take_each_unit_exactly_once(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_take_all, args=(tmp_path, queue)) for _ in range(3)]
    for w in workers:
        w.start()
    taken = [queue.get(timeout=60) for _ in workers]
    for w in workers:
        w.join()
    assert sorted(u for t in taken for u in t) == UNITS
    assert not list(tmp_path.glob("*.claim"))


def test_a_claim_is_kept_from_others_while_its_owner_lives(tmp_path):
    with subprocess.Popen(["sleep", "60"]) as other:
        (tmp_path / "u-1.claim").write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid}))
        assert not Claims(tmp_path, lease_s=60).claim("u-1")
        other.kill()
        other.wait()
        claims = Claims(tmp_path, lease_s=60)
        assert claims.claim("u-1")  # its owner died: taken over
        assert json.loads((tmp_path / "u-1.claim").read_text())["pid"] == os.getpid()


def test_a_claim_of_another_host_counts_as_dead_past_its_lease(tmp_path):
    path = tmp_path / "u-1.claim"
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    assert not Claims(tmp_path, lease_s=60).claim("u-1")
    old = time.time() - 61
    os.utime(path, (old, old))
    claims = Claims(tmp_path, lease_s=60)
    assert claims.claim("u-1")
    claims.touch("u-1")
    assert time.time() - path.stat().st_mtime < 5  # renewed by its new owner
    claims.release("u-1")
    assert not path.exists()


def test_a_done_unit_is_not_claimed_and_a_half_written_claim_waits_for_its_lease(tmp_path):
    (tmp_path / "u-1.idx.npz").write_bytes(b"done")
    assert not Claims(tmp_path, lease_s=60).claim("u-1")
    (tmp_path / "u-2.claim").write_text("")  # its creator was killed before writing who it is
    assert not Claims(tmp_path, lease_s=60).claim("u-2")
    assert Claims(tmp_path, lease_s=1e-6).claim("u-2")
