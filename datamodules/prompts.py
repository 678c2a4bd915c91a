"""`PromptDataModule`: visual prompts for LVM `predict`, each a list of images to continue, with optional ground truth.

Three origins, exactly one per run:
- `file`: YAML (a list, or `{prompts: [...]}`) or JSONL (one object a line) of entries
  `{"images": [paths], "truth": [paths], "kind": "sequence", "num_frames": 2, "name": "..."}`; only `images` is
  required, paths are relative to the file.
- `folder`: every sub-folder holding images is one prompt (natural file order; a `truth/` sub-folder inside holds its
  ground truth); loose images in `folder` itself make one prompt.
- `source`: held-out sentences of a `SentenceSource` (e.g. the built-in one), cut into prompt + ground truth by kind.

Kinds: `sequence` (continue by `num_frames` frames), `analogy` (`A, A', B -> B'`: one frame), `category` (extend a set
of images of one class by `num_frames`; its truth shows held-out members of the class, not the one right answer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from datamodules.imageio import IMAGE_EXTENSIONS, BadImage, fit_image, load_rgb
from datamodules.sentences import VisualSentenceDataModule
from datamodules.sources.base import SentenceSource
from datamodules.sources.folder_index import natural_key
from lvm_pl.batches import PromptBatch, pad_stacks
from lvm_pl.console import UserError, say
from lvm_pl.images import to_tensor
from lvm_pl.kinds import PROMPTABLE
from lvm_pl.stage_data import StageData

Image = str | np.ndarray  # a file path, or uint8 [H, W, 3] already in memory


@dataclass
class Prompt:
    """Images to continue, frames to generate, and optional ground truth (paths or uint8 [H, W, 3] arrays); `source`
    says where it came from (a grid's caption)."""

    name: str
    kind: str
    images: list[Image]
    num_frames: int
    truth: list[Image] = field(default_factory=list)
    source: str = ""


def split_sentence(images: list, kind: str, num_frames: int) -> tuple[list, list] | None:
    """A whole sentence -> (prompt, ground truth) for its kind, or None when it is too short to prompt with."""
    if kind == "analogy":
        return (images[:-1], images[-1:]) if len(images) >= 2 else None
    if kind in ("sequence", "category"):
        held = min(num_frames, len(images) - 1)
        return (images[:-held], images[-held:]) if held >= 1 else None
    return None


class PromptDataset(Dataset):
    """Item `k`: prompt `k` loaded, resized to `image_size` (centre crop) and converted to [-1, 1] tensors."""

    def __init__(self, prompts: list[Prompt], image_size: int) -> None:
        self.prompts, self.image_size = prompts, image_size

    def __len__(self) -> int:
        return len(self.prompts)

    def _load(self, image: Image, prompt: Prompt) -> torch.Tensor:
        if isinstance(image, str):
            try:
                image = load_rgb(image, min_side=self.image_size)
            except BadImage as err:
                raise UserError(f"prompt {prompt.name!r}: {err}") from None
        return to_tensor(fit_image(image, self.image_size))  # [3, H, W]

    def __getitem__(self, k: int) -> dict:
        p = self.prompts[k]
        truth = [self._load(x, p) for x in p.truth]
        return {
            "prompt": torch.stack([self._load(x, p) for x in p.images]),  # [N, 3, H, W]
            "truth": torch.stack(truth) if truth else None,
            "num_frames": p.num_frames,
            "kind": p.kind,
            "name": p.name,
            "source": p.source or p.name,
            "index": k,
        }


def collate_prompts(items: list[dict]) -> PromptBatch:
    """Prompt items -> a `PromptBatch`; image stacks are zero-padded to the longest in the batch."""
    like = items[0]["prompt"]
    prompt, num_prompt = pad_stacks([it["prompt"] for it in items], like)
    truth, num_truth = pad_stacks([it["truth"] for it in items], like)
    return PromptBatch(
        prompt=prompt,
        num_prompt=num_prompt,
        num_frames=torch.tensor([it["num_frames"] for it in items], dtype=torch.long),
        truth=truth,
        num_truth=num_truth,
        index=torch.tensor([it["index"] for it in items], dtype=torch.long),
        kinds=[it["kind"] for it in items],
        names=[it["name"] for it in items],
        sources=[it.get("source", it["name"]) for it in items],
    )


class PromptDataModule(LightningDataModule, StageData):
    """Prompts from a `file`, a `folder` or a sentence `source` (give exactly one) for `predict`.

    `kind`: the kind of folder prompts and the default of file entries; with a `source`, only sentences of that kind
    (None: sequences, analogies and categories). `num_frames`: frames generated per sequence/category prompt unless
    an entry says otherwise (analogies: 1). `limit`: at most that many prompts. Images are resized to `image_size`.
    """

    layout = None
    seq_len = None
    predict_split = None

    def __init__(
        self,
        file: str | None = None,
        folder: str | None = None,
        source: SentenceSource | None = None,
        split: Literal["train", "val", "test"] = "val",
        kind: Literal["sequence", "analogy", "category"] | None = None,
        num_frames: int = 1,
        limit: int | None = None,
        image_size: int = 64,
        batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        given = [name for name, value in (("file", file), ("folder", folder), ("source", source)) if value is not None]
        if len(given) != 1:
            raise UserError(f"data: give exactly one of data.file, data.folder, data.source (got {given or 'none'})")
        if num_frames < 1 or image_size < 1 or batch_size < 1 or num_workers < 0 or (limit is not None and limit < 1):
            raise UserError(
                f"data: num_frames={num_frames}, image_size={image_size}, batch_size={batch_size}, limit={limit} must"
                f" be >= 1 and num_workers={num_workers} >= 0"
            )
        self.file, self.folder, self.source, self.split, self.kind = file, folder, source, split, kind
        self.num_frames, self.limit, self.image_size = num_frames, limit, image_size
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.prompts: list[Prompt] = []

    def setup(self, stage: str | None = None) -> None:
        """List the prompts once and check every file they name exists."""
        if self.prompts:
            return
        if self.file is not None:
            prompts = self._from_file(Path(self.file))
        elif self.folder is not None:
            prompts = self._from_folder(Path(self.folder))
        else:
            prompts = self._from_source()
        self.prompts = prompts[: self.limit]
        if not self.prompts:
            raise UserError(f"data: no prompts found in {self.file or self.folder or self.split + ' sentences'}")
        say(f"prompts: {len(self.prompts)} ({', '.join(sorted({p.kind for p in self.prompts}))})")

    # ---------------------------------------------------------------- origins

    def _entry(self, entry: object, where: str, base: Path, number: int) -> Prompt:
        """One file entry -> Prompt, with every error naming `where` (file and entry number)."""
        if not isinstance(entry, dict) or not isinstance(entry.get("images"), list) or not entry["images"]:
            raise UserError(f"{where}: expected a mapping with a non-empty list `images`, got {entry!r}")
        kind = entry.get("kind", self.kind or "sequence")
        if kind not in PROMPTABLE:
            raise UserError(f"{where}: kind={kind!r} is not one of {list(PROMPTABLE)}")
        frames = entry.get("num_frames", 1 if kind == "analogy" else self.num_frames)
        if not isinstance(frames, int) or frames < 1:
            raise UserError(f"{where}: num_frames={frames!r} must be an integer >= 1")
        paths = {}
        for key in ("images", "truth"):
            values = entry.get(key) or []
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise UserError(f"{where}: `{key}` must be a list of image paths, got {values!r}")
            paths[key] = [str(base / v) for v in values]
            for path in paths[key]:
                if not Path(path).is_file():
                    raise UserError(f"{where}: {key} file {path} does not exist")
        name = str(entry.get("name", f"{number:05d}_{kind}"))
        return Prompt(name, kind, paths["images"], frames, paths["truth"], where)

    def _from_file(self, path: Path) -> list[Prompt]:
        try:
            text = path.read_text()
        except OSError as err:
            raise UserError(f"data.file={path}: cannot read ({err.strerror})") from None
        try:
            if path.suffix == ".jsonl":
                entries = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                entries = yaml.safe_load(text)
                entries = entries.get("prompts") if isinstance(entries, dict) else entries
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            detail = " ".join(str(err).split())  # one line, as UserError messages are
            raise UserError(
                f"data.file={path}: not valid {'JSONL' if path.suffix == '.jsonl' else 'YAML'}: {detail}"
            ) from None
        if not isinstance(entries, list):
            raise UserError(f"data.file={path}: expected a list of prompts (or a mapping with key `prompts`)")
        return [self._entry(e, f"{path} prompt {i}", path.parent, i) for i, e in enumerate(entries)]

    def _from_folder(self, root: Path) -> list[Prompt]:
        if not root.is_dir():
            raise UserError(f"data.folder={root}: not a directory")

        def images(folder: Path) -> list[str]:
            files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
            return [str(p) for p in sorted(files, key=natural_key)]

        kind = self.kind or "sequence"
        frames = 1 if kind == "analogy" else self.num_frames
        folders = [root, *sorted((d for d in root.iterdir() if d.is_dir()), key=natural_key)]
        prompts = []
        for folder in folders:
            if folder.name == "truth" or not (found := images(folder)):
                continue
            truth = images(folder / "truth") if (folder / "truth").is_dir() else []
            name = root.name if folder == root else folder.name
            prompts.append(Prompt(name, kind, found, frames, truth, str(folder)))
        return prompts

    def _from_source(self) -> list[Prompt]:
        sentences = VisualSentenceDataModule(self.source, image_size=self.image_size, seed=self.seed)
        kinds = (self.kind,) if self.kind is not None else PROMPTABLE
        prompts = []
        for index in range(sentences.split_size(self.split)):
            if self.limit is not None and len(prompts) >= self.limit:
                break
            s = sentences.sentence(self.split, index)
            cut = split_sentence(s.images, s.kind, self.num_frames) if s.kind in kinds else None
            if cut is not None:
                family = s.meta.get("family", s.kind)
                name = f"{self.split}{index:05d}_{s.kind}_{family}"
                where = f"{type(self.source).__name__} {self.split} sentence {index} ({family})"
                prompts.append(Prompt(name, s.kind, cut[0], len(cut[1]), cut[1], where))
        return prompts

    # ---------------------------------------------------------------- loaders

    def predict_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(
            PromptDataset(self.prompts, self.image_size),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_prompts,
        )
