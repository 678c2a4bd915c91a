"""Image folders: `root/<sentence>/*.png|jpg|...` is one sentence, a loose image in `root` is a single-image sentence,
or a JSONL manifest lists sentences (`{"images": [paths relative to the manifest], "kind": ..., "meta": {...}}`)."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from datamodules.imageio import IMAGE_EXTENSIONS, BadImage, check_image, load_rgb
from datamodules.sources.base import SentenceSource, VisualSentence, partition
from lvm_pl.console import UserError, say, warn
from lvm_pl.kinds import KINDS


def natural_key(path: Path) -> list:
    """Sort key that puts frame2 before frame10."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


class FolderSource(SentenceSource):
    """Sentences from image files on disk, split by a seeded hash of each sentence's name (stable as files are added).

    Bad files (corrupt, truncated, empty, not images, over Pillow's pixel limit) are skipped with one warning counting
    them, or raise naming the path when `strict`. `verify` decodes every file once at setup (JPEGs at 1/8 scale) to
    find bad ones early.
    """

    def __init__(
        self,
        root: str,
        manifest: str | None = None,
        kind: str = "sequence",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        strict: bool = False,
        verify: bool = True,
        verify_threads: int = 4,
    ) -> None:
        if kind not in KINDS:
            raise UserError(f"data.source.kind: {kind!r} is not one of {list(KINDS)}")
        if not (val_fraction >= 0 and test_fraction >= 0 and val_fraction + test_fraction < 1):
            raise UserError(f"data.source: val_fraction={val_fraction}, test_fraction={test_fraction} must sum to < 1")
        self.root, self.manifest, self.kind = Path(root), manifest, kind
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.strict, self.verify, self.verify_threads = strict, verify, verify_threads
        self.items: list[dict] = []
        self.splits: dict[str, list[int]] = {}
        self.image_size = 0

    def setup(self, image_size: int, seed: int) -> None:
        self.image_size = image_size
        items = self._read_manifest() if self.manifest else self._scan()
        if not items:
            where = self.manifest or self.root
            raise UserError(f"{where}: no sentences found (expected image files or sentence folders)")
        self.items = self._drop_bad(items)
        self.splits = partition([it["name"] for it in self.items], seed, self.val_fraction, self.test_fraction)
        say(
            f"folder {self.root}: {len(self.items)} sentences, "
            + ", ".join(f"{k} {len(v)}" for k, v in self.splits.items())
        )

    def _scan(self) -> list[dict]:
        if not self.root.is_dir():
            raise UserError(f"data.source.root: {self.root} is not a folder")
        items, skipped = [], []
        for entry in sorted(self.root.iterdir(), key=natural_key):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                files = [
                    p for p in sorted(entry.iterdir(), key=natural_key) if p.is_file() and not p.name.startswith(".")
                ]
                images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
                skipped += [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
                items.append({"name": entry.name, "paths": images, "kind": self.kind, "meta": {"path": str(entry)}})
            elif entry.suffix.lower() in IMAGE_EXTENSIONS:
                items.append({"name": entry.name, "paths": [entry], "kind": "single", "meta": {"path": str(entry)}})
            else:
                skipped.append(entry)
        self._report(skipped, "not image files")
        return items

    def _read_manifest(self) -> list[dict]:
        path = Path(self.manifest)
        if not path.is_file():
            raise UserError(f"data.source.manifest: {path} does not exist")
        items = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                paths = [path.parent / p for p in rec["images"]]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise UserError(f"{path}:{n}: expected a JSON object with an 'images' list ({err})") from None
            kind = rec.get("kind", self.kind)
            if kind not in KINDS:
                raise UserError(f"{path}:{n}: kind {kind!r} is not one of {list(KINDS)}")
            missing = [str(p) for p in paths if not p.is_file()]
            if missing:
                raise UserError(f"{path}:{n}: missing image {missing[0]}")
            meta = {"path": f"{path}:{n}", **rec.get("meta", {})}
            items.append(
                {"name": rec.get("name", f"{n}:" + ",".join(rec["images"])), "paths": paths, "kind": kind, "meta": meta}
            )
        return items

    def _drop_bad(self, items: list[dict]) -> list[dict]:
        if not self.verify:
            return items
        paths = [p for it in items for p in it["paths"]]
        with ThreadPoolExecutor(self.verify_threads) as pool:  # PIL releases the GIL while decoding
            errors = dict(zip(paths, pool.map(self._error_of, paths), strict=True))
        bad = [p for p, e in errors.items() if e is not None]
        if bad and self.strict:
            raise UserError(f"bad image (strict: true): {errors[bad[0]]}")
        self._report(bad, "unreadable images (corrupt, truncated, empty or over Pillow's pixel limit)")
        bad_set = set(bad)
        return [{**it, "paths": [p for p in it["paths"] if p not in bad_set]} for it in items]

    @staticmethod
    def _error_of(path: Path) -> str | None:
        try:
            check_image(path)
        except BadImage as err:
            return str(err)
        return None

    def _report(self, skipped: list[Path], what: str) -> None:
        if not skipped:
            return
        if self.strict:
            raise UserError(f"{skipped[0]}: {what} (strict: true); remove it or set strict: false")
        warn(f"{self.root}: skipped {len(skipped)} {what}, e.g. {skipped[0]}")

    def split_size(self, split: str) -> int:
        return len(self.splits.get(split, []))

    def num_images(self, split: str, index: int) -> int:
        return len(self.items[self.splits[split][index]]["paths"])

    def sentence(self, split: str, index: int) -> VisualSentence:
        item = self.items[self.splits[split][index]]
        try:
            images = [load_rgb(p, min_side=self.image_size) for p in item["paths"]]
        except BadImage as err:  # changed on disk since setup
            raise UserError(f"bad image: {err}") from None
        return VisualSentence(images, item["kind"], {**item["meta"], "files": [str(p) for p in item["paths"]]})

    def image(self, split: str, index: int, position: int) -> tuple[np.ndarray, str]:
        item = self.items[self.splits[split][index]]
        try:
            return load_rgb(item["paths"][position], min_side=self.image_size), item["kind"]
        except BadImage as err:
            raise UserError(f"bad image: {err}") from None

    def describe(self, split: str, index: int) -> str:
        return self.items[self.splits[split][index]]["meta"]["path"]
