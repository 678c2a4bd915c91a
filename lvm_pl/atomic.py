"""Atomic outputs: every file lvm-pl writes appears whole or not at all (temp file in the same folder + rename).

Temp names are `.<target>.tmp-<host>-<pid>-<random>`: the first write of a process into a directory removes the temp
files there whose writer (same host, that pid) is dead, e.g. killed by SIGKILL mid-save. Storage faults (disk full,
read-only, no permission) become a `StorageError` naming the target, and the previous file stays as it was.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lvm_pl.console import UserError, say

# mkstemp creates files readable by the owner alone; outputs get the permissions a plain open() would give
_UMASK = os.umask(0)
os.umask(_UMASK)
HOST = socket.gethostname()
TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)-(?P<random>[A-Za-z0-9_]+)$")
FULL = {errno.ENOSPC, errno.EDQUOT}
DENIED = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
_swept: set[Path] = set()


class StorageError(UserError):
    """Disk full, read-only or not permitted while writing an output; the message names the path."""


def temp_prefix(path: Path) -> str:
    """The start of this process's temp names for `path` (mkstemp/mkdtemp add the random part)."""
    return f".{path.name}.tmp-{HOST}-{os.getpid()}-"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (a zombie, killed but not yet reaped, counts as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _size(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file())
    return path.lstat().st_size


def sweep_stale(directory: str | os.PathLike) -> tuple[int, int]:
    """Remove the temp files (and temp dirs) in `directory` left by dead writers of this host; (count, bytes)."""
    directory = Path(directory)
    count = freed = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in directory.iterdir():
            found = TEMP_NAME.match(entry.name)
            if not found or found["host"] != HOST or int(found["pid"]) == os.getpid() or pid_alive(int(found["pid"])):
                continue
            with contextlib.suppress(FileNotFoundError):  # another process may sweep the same file
                size = _size(entry)
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                count, freed = count + 1, freed + size
    if count:
        say(f"{directory}: removed {count} temp files left by killed writers ({freed:,} bytes freed)")
    return count, freed


def _sweep_once(directory: Path) -> None:
    if directory not in _swept:
        sweep_stale(directory)
        _swept.add(directory)


def storage_fault(
    err: BaseException, path: str | os.PathLike, needed: int | None = None, written: int | None = None
) -> StorageError | None:
    """A `StorageError` naming `path` when `err` is a full disk, a read-only file system or a denied permission;
    `needed`: the output's size when known, `written`: the bytes written before the disk filled."""
    cause = next((e for e in error_chain(err) if getattr(e, "errno", None) in FULL | DENIED.keys()), err)
    code = getattr(cause, "errno", None)  # torch's writer reports the OSError it met as the context of its own
    full = code in FULL or "No space left on device" in str(err)
    if not full and code not in DENIED:
        return None
    path = Path(path)
    kept = " (the previous file is untouched)" if path.exists() else ""
    if not full:
        return StorageError(f"{path}: cannot write, {DENIED[code]}; choose a writable output location{kept}")
    free = next((shutil.disk_usage(p).free for p in (path, *path.parents) if p.exists()), None)
    need = f"needs {needed:,} bytes, " if needed is not None else ""
    if needed is None and written:
        need = f"needs more than the {written:,} bytes written, "
    full_text = f"no space left on device ({need}{free:,} bytes free); free space or write elsewhere"
    return StorageError(f"{path}: {full_text}{kept}")


def error_chain(err: BaseException | None) -> Iterator[BaseException]:
    """`err` and the exceptions it was raised from or during, each once."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


@contextlib.contextmanager
def storage_errors(path: str | os.PathLike, needed: int | None = None, tmp: Path | None = None) -> Iterator[None]:
    """Re-raise a storage fault inside the block as a `StorageError` naming `path` (`tmp`: the partial output)."""
    try:
        yield
    except StorageError:
        raise  # named already, by an inner writer
    except Exception as err:  # noqa: BLE001 - writers wrap OS errors (safetensors, torch): re-raised unless storage
        written = tmp.stat().st_size if tmp is not None and tmp.exists() else None
        fault = storage_fault(err, path, needed, written)
        if fault is None:
            raise
        raise fault from err


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, size: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is fsynced and renamed over `path`, else removed.
    `size`, when known, is reserved first: a full disk is reported (needed vs free) before anything is written."""
    path = Path(path)
    with storage_errors(path, size):
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep_once(path.parent)
        fd, name = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
        tmp = Path(name)
        try:
            if size:
                os.posix_fallocate(fd, 0, size)
        except OSError as err:
            if err.errno in FULL:
                tmp.unlink(missing_ok=True)
                raise
            # a file system without fallocate: the write itself reports a full disk
        finally:
            os.close(fd)
    try:
        with storage_errors(path, size, tmp):
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to `path` (which must be absent or empty); on success its files are fsynced
    and it is renamed to `path`, else removed. A directory output (e.g. a Hugging Face model) appears whole or not."""
    path = Path(path)
    with storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep_once(path.parent)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), dir=path.parent))
    try:
        with storage_errors(path):
            yield tmp
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            os.chmod(tmp, 0o777 & ~_UMASK)
            if path.exists():
                path.rmdir()  # empty: the caller refuses a non-empty one
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path, size=len(data)) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_image(path: str | os.PathLike, image: Any, format: str = "PNG") -> None:
    """Save a PIL image to `path` atomically."""
    buf = io.BytesIO()
    image.save(buf, format=format)
    write_bytes(path, buf.getvalue())


def torch_save(path: str | os.PathLike, obj: Any) -> None:
    """`torch.save` to `path` atomically."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)  # into a file object: a full disk is an OSError (ENOSPC), not torch's RuntimeError
