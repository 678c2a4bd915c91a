"""How lvm-pl talks to a user: one-line messages on rank zero, and the error type for mistakes a user can fix."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TypeVar

log = logging.getLogger("lvm_pl")
T = TypeVar("T")


class UserError(Exception):
    """A mistake in the user's input (file, key or value). `main.py` prints it as one line and exits with code 2."""


def say(message: str) -> None:
    """Print a user-facing message once (rank zero only)."""
    from lightning.pytorch.utilities import rank_zero_info  # here: light tools (lvm_pl.atomic) load without Lightning

    rank_zero_info(f"[lvm-pl] {message}")


def warn(message: str) -> None:
    """Warn once (rank zero only), through Python's warnings so tests can catch it."""
    from lightning.pytorch.utilities import rank_zero_warn

    rank_zero_warn(f"[lvm-pl] {message}")


PROGRESS_DELAY_S = 3.0  # a bar appears only for work that takes longer than this


def progress(items: Iterable[T], what: str, total: int | None = None) -> Iterator[T]:
    """`items`, with a progress bar (tqdm, rank zero only) once iterating them has taken over a few seconds."""
    from lightning.pytorch.utilities import rank_zero_only
    from tqdm import tqdm

    bar = tqdm(items, desc=f"[lvm-pl] {what}", total=total, delay=PROGRESS_DELAY_S, disable=rank_zero_only.rank != 0)
    return iter(bar)
