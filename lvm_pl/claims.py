"""Claims on the work units of a tokenize run: which process is writing which unit's shard, across machines.

A unit is done when its shard's index `<unit>.idx.npz` exists (written last, atomically). A process takes a unit by
creating `<unit>.claim` with O_CREAT|O_EXCL (host, pid, time inside), which one process alone can win, also on NFS
v3+ and the usual shared file systems. A claim whose pid is dead on this host, or whose file was not touched for
`lease_s` seconds (a process on another host that died), is taken over. Owners touch their claims while they work.
Two processes racing for the same stale claim may both do the unit: harmless, the shard is a function of the unit,
so both write the same bytes (each through its own temp file and an atomic rename).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from lvm_pl.atomic import pid_alive, storage_errors
from lvm_pl.console import warn

INDEX_SUFFIX = ".idx.npz"
CLAIM_SUFFIX = ".claim"


@dataclass
class Claims:
    """The claims in `directory` as one process (`host`, `pid`: the tokenize process, also inside its DataLoader
    workers) sees them; plain data, so it travels to the workers."""

    directory: Path
    lease_s: float
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)

    def done(self, unit: str) -> bool:
        """Whether `unit`'s shard is complete."""
        return (self.directory / f"{unit}{INDEX_SUFFIX}").exists()

    def claim(self, unit: str) -> bool:
        """Take `unit` for this process; False if it is done or another live process holds it."""
        path = self.directory / f"{unit}{CLAIM_SUFFIX}"
        for _ in range(2):
            if self.done(unit):
                return False
            try:
                with storage_errors(path):  # a read-only output_dir is named here, before any work
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                if not self._take_over(path):
                    return False
                continue
            try:
                with storage_errors(path), os.fdopen(fd, "w") as f:
                    json.dump({"host": self.host, "pid": self.pid, "time": time.time()}, f)
            except BaseException:
                path.unlink(missing_ok=True)  # a claim saying no owner would hold its unit for a whole lease
                raise
            if self.done(unit):  # finished by its previous owner between our check and our create
                self.release(unit)
                return False
            return True
        return False

    def touch(self, unit: str) -> None:
        """Renew this process's claim on `unit` (its mtime is the lease clock)."""
        # gone: taken over after a lease ran out; the unit's shard comes out the same whoever writes it
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.directory / f"{unit}{CLAIM_SUFFIX}")

    def release(self, unit: str) -> None:
        """Drop this process's claim on `unit` (done, or given up)."""
        path = self.directory / f"{unit}{CLAIM_SUFFIX}"
        if self._mine(self.owner(path)):
            path.unlink(missing_ok=True)

    def release_all(self) -> None:
        """Drop every claim of this process (a failing run; also units its DataLoader workers had just claimed)."""
        for path in self.directory.glob(f"*{CLAIM_SUFFIX}"):
            if self._mine(self.owner(path)):
                path.unlink(missing_ok=True)

    def _mine(self, owner: dict) -> bool:
        return owner.get("host") == self.host and owner.get("pid") == self.pid

    def owner(self, path: Path) -> dict:
        """What a claim file says (empty if gone or half-written by a process killed between create and write)."""
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def _take_over(self, path: Path) -> bool:
        """Remove a stale claim (dead pid on this host, or no touch for `lease_s`); whether it was stale."""
        owner = self.owner(path)
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True  # released meanwhile: try again
        if self._mine(owner):
            return False  # another DataLoader worker of this process has it
        if owner.get("host") == self.host and isinstance(owner.get("pid"), int) and not pid_alive(owner["pid"]):
            reason = f"dead process {owner['pid']}"
        elif age > self.lease_s:
            who = f"host {owner.get('host')}, pid {owner.get('pid')}"
            reason = f"{who}, untouched for {age:.0f} s (lease_s={self.lease_s:g})"
        else:
            return False
        warn(f"{path}: taking over the claim of {reason}")
        path.unlink(missing_ok=True)
        return True
