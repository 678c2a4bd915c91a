"""The kinds of visual sentence: the one list every part of lvm-pl names them from."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

Kind = Literal["sequence", "analogy", "category", "single"]
KINDS: tuple[str, ...] = ("sequence", "analogy", "category", "single")
# kinds whose last image follows from the ones before it: what prompts and next-image evaluation use
PROMPTABLE: tuple[str, ...] = ("sequence", "analogy", "category")
# kinds whose next image can be scored against a copy of the image before it
NEXT_FRAME: tuple[str, ...] = ("sequence", "analogy")


def kind_order(kinds: Iterable[str]) -> list[str]:
    """`kinds` in the canonical order (unknown ones last, sorted): for tables and grids."""
    kinds = set(kinds)
    return [k for k in KINDS if k in kinds] + sorted(kinds - set(KINDS))
