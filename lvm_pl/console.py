"""How lvm-pl talks to a user: one-line messages on rank zero, and the error type for mistakes a user can fix."""

from __future__ import annotations

import logging

log = logging.getLogger("lvm_pl")


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
