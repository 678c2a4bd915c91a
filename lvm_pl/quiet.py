"""Library output a user cannot act on, silenced where it arises: each caller names the exact message and module and
says why in a comment. Everything else (Lightning's advice a user can follow, our own `[lvm-pl]` lines) still shows."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def ignoring(*found: tuple[str, str]) -> Iterator[None]:
    """Inside the block, ignore the warnings of each (message, module): regexes matched at the start of the message
    and against the full name of the module the warning is attributed to."""
    with warnings.catch_warnings():
        for message, module in found:
            warnings.filterwarnings("ignore", message=message, module=module)
        yield


class _Drop(logging.Filter):
    """Drop a logger's records whose message starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_process() -> None:
    """Process-wide, for `main.py`: what arises inside every Trainer run rather than at one call of ours."""
    # Lightning 2.6's own pytree helper builds torch's deprecated LeafSpec on every loop; nothing for a user to change
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    # every Trainer advertises Lightning's cloud services (litlogger, litmodels); runs here are offline by design
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_Drop("💡 Tip: For seamless cloud"))
    # importing DeepSpeed without a GPU (convert-zero, the ZeRO checks) logs that it fell back to the CPU: it needs none
    logging.getLogger("DeepSpeed").addFilter(_Drop("Setting accelerator to CPU"))
    # our own warnings (lvm_pl.console.warn) are one line each: the message, without Python's file, category and source
    library_format = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None) -> str:
        if str(message).startswith("[lvm-pl]"):
            return f"{message}\n"
        return library_format(message, category, filename, lineno, line)

    warnings.formatwarning = one_line
