import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lvm_pl import atomic
from lvm_pl.checkpoint_io import AtomicCheckpointIO

REPO = Path(__file__).resolve().parents[2]


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "a" / "out.json"
    atomic.write_json(p, {"x": 1})
    atomic.write_json(p, {"x": 2})
    assert p.read_text().strip().endswith("}")
    assert '"x": 2' in p.read_text()
    assert [f.name for f in p.parent.iterdir()] == ["out.json"]


def test_failure_leaves_previous_file_and_no_temp(tmp_path):
    p = tmp_path / "out.txt"
    atomic.write_text(p, "good")
    with pytest.raises(RuntimeError), atomic.atomic_path(p) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert p.read_text() == "good"
    assert [f.name for f in tmp_path.iterdir()] == ["out.txt"]


def test_outputs_get_the_permissions_of_a_plain_open(tmp_path):
    plain, atomic_file = tmp_path / "plain.txt", tmp_path / "atomic.txt"
    plain.write_text("x")
    atomic.write_text(atomic_file, "x")
    assert atomic_file.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_atomic_dir_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic.atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("killed before the weights")
    assert list(tmp_path.iterdir()) == []
    out.mkdir()  # an empty directory is taken over
    with atomic.atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights.bin").write_bytes(b"w")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["config.json", "sub", "sub/weights.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    plain = tmp_path / "plain"
    plain.mkdir()
    assert out.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def _killed_writer(directory, name: str, payload: int) -> None:
    """A process that dies by SIGKILL while it writes `directory/name` through atomic_path (a kill mid-save)."""
    script = textwrap.dedent(f"""
        import os, signal
        from lvm_pl.atomic import atomic_path

        with atomic_path({str(directory / name)!r}) as tmp:
            tmp.write_bytes(b"x" * {payload})
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL


def test_temp_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path, caplog):
    """kill -9 skips the cleanup, so the temp file stays; the next write into that directory removes it and says
    how many bytes it freed. The pattern names the writer: `.<target>.tmp-<host>-<pid>-<random>`."""
    _killed_writer(tmp_path, "last.ckpt", 12345)
    (left,) = tmp_path.iterdir()
    found = atomic.TEMP_NAME.match(left.name)
    assert found and found["target"] == "last.ckpt" and found["host"] == atomic.HOST
    atomic._swept.clear()  # a fresh process: the next run
    with caplog.at_level(logging.INFO):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, tmp_path / "last.ckpt")  # a resumed run's next save
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert "removed 1 temp files left by killed writers (12,345 bytes freed)" in caplog.text


def test_temp_files_of_live_writers_and_other_hosts_are_kept(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from lvm_pl.atomic import atomic_path

        with atomic_path({str(tmp_path / "out.bin")!r}) as tmp:
            tmp.write_bytes(b"partial")
            print("writing", flush=True)
            time.sleep(60)
    """)
    live = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env={**os.environ,
                            "PYTHONPATH": str(REPO)})  # fmt: skip
    try:
        assert live.stdout.readline().strip() == b"writing"
        other_host = tmp_path / ".out.bin.tmp-elsewhere-1-abcdefgh"
        other_host.write_bytes(b"?")
        atomic._swept.clear()
        assert atomic.sweep_stale(tmp_path) == (0, 0)
        atomic.write_bytes(tmp_path / "other.bin", b"done")
        names = {p.name for p in tmp_path.iterdir()}
        assert {"other.bin", other_host.name} < names and len(names) == 3  # the live writer's temp is there
    finally:
        live.kill()
        live.wait()
    assert atomic.sweep_stale(tmp_path) == (1, len(b"partial"))  # dead now: removed


def test_a_killed_export_directory_is_removed_too(tmp_path):
    dead = tmp_path / f".model.tmp-{atomic.HOST}-{_dead_pid()}-abcdefgh"
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "weights.bin").write_bytes(b"w" * 100)
    atomic._swept.clear()
    with atomic.atomic_dir(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)
