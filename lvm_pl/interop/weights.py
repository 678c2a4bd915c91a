"""Weight files as Hugging Face libraries write them: one or sharded `.safetensors` or `.bin`, in any float dtype.

Files the user did not make are data: safetensors, or `torch.load(weights_only=True)`. Shards are read one at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from lvm_pl.console import UserError
from lvm_pl.safe_load import load_torch_file


def weight_files(path: Path, stems: tuple[str, ...]) -> list[Path]:
    """The weight files of a model directory: `<stem>.safetensors`, `<stem>.bin`, or the shards their
    `.index.json` lists (safetensors first); UserError naming the directory when there are none."""
    for stem in stems:
        for ext in ("safetensors", "bin"):
            single, index = path / f"{stem}.{ext}", path / f"{stem}.{ext}.index.json"
            if single.is_file():
                return [single]
            if index.is_file():
                try:
                    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                except (json.JSONDecodeError, KeyError, AttributeError):
                    raise UserError(f"{index}: not a weight index (no weight_map)") from None
                missing = [s for s in shards if not (path / s).is_file()]
                if missing:
                    raise UserError(f"{index}: lists {missing[0]}, which is not in {path}")
                return [path / s for s in shards]
    names = ", ".join(f"{s}.safetensors" for s in stems)
    raise UserError(f"{path}: no weights ({names}, .bin or a sharded .index.json)")


def read_shard(file: Path) -> dict[str, torch.Tensor]:
    """One weight file's tensors, as stored (dtype kept)."""
    if file.suffix != ".safetensors":
        state = load_torch_file(file, mmap=True)  # weights-only; a code-carrying file is refused by name
    else:
        try:
            from safetensors.torch import load_file

            return load_file(str(file))
        except Exception as err:  # noqa: BLE001 - any unreadable weight file is the user's to fix
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"{file}: cannot read weights ({detail})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{file}: not a state dict of tensors")
    return state


def iter_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) over every file, one shard in memory at a time."""
    for file in tqdm(files, desc="reading weights", unit="file"):
        yield from read_shard(file).items()


def read_weights(path: Path, stems: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory (see `weight_files`)."""
    return dict(iter_weights(weight_files(path, stems)))
