"""`preview-data`: a PNG grid of sample sentences from any data config (`-c`), one row per sentence, grouped and
named by kind and family."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch import LightningDataModule
from PIL import Image

from lvm_pl.atomic import save_image
from lvm_pl.console import UserError, say
from lvm_pl.images import labelled_grid
from lvm_pl.kinds import kind_order


def load_datamodule(configs: list[str], overrides: Sequence[str] = ()) -> LightningDataModule:
    """Build the `data:` section of one or more YAML configs (later files override earlier ones), then the `--data.*`
    flags of `overrides`."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data", required=True)
    cfg = None
    for path in configs:
        if not Path(path).is_file():
            raise UserError(f"{path}: data config not found")
        section = (yaml.safe_load(Path(path).read_text()) or {}).get("data")
        if section is None:
            continue
        try:
            cfg = parser.parse_object({"data": section}, cfg_base=cfg, defaults=cfg is None)
        except Exception as err:  # jsonargparse reports bad keys/values as several error types
            raise UserError(f"{path}: bad data section: {err}".splitlines()[0]) from None
    if cfg is None:
        raise UserError(f"{', '.join(configs)}: no `data:` section")
    if overrides:
        cfg = parser.parse_args(list(overrides), namespace=cfg)  # a bad key is jsonargparse's error, worded by main
    return parser.instantiate_classes(cfg).data


def preview_data(
    configs: list[str],
    output: str = "preview.png",
    per_kind: int = 3,
    split: Literal["train", "val", "test"] = "val",
) -> Path:
    """Write a grid of `per_kind` sentences of each kind (and each built-in family) of `split` to `output`, each row
    named by its kind and family.

    Args:
        configs: data config YAML(s), `-c configs/data/builtin.yaml` (composed in order; the `data:` sections only).
        output: PNG path to write.
        per_kind: sentences shown per kind (per family for the built-in source).
        split: train, val or test.
    """
    dm = load_datamodule(configs)
    groups: dict[tuple[str, str], list] = {}
    for s in dm.sentences(split):
        rows = groups.setdefault((s.kind, str(s.meta.get("family", ""))), [])
        if len(rows) < per_kind:
            rows.append(s.images)
    if not groups:
        raise UserError(f"{', '.join(configs)}: split {split!r} has no sentences")
    kinds = kind_order(k for k, _ in groups)
    order = sorted(groups, key=lambda k: (kinds.index(k[0]), k[1]))
    names = {key: f"{key[0]}/{key[1]}" if key[1] and key[1] != key[0] else key[0] for key in order}
    rows = [images for key in order for images in groups[key]]
    labels = [names[key] for key in order for _ in groups[key]]
    caption = f"{', '.join(configs)}: {split} split, {len(rows)} sentences"
    save_image(output, Image.fromarray(labelled_grid(rows, caption=caption, row_labels=labels)))
    say(f"wrote {output}: {len(rows)} sentences, " + ", ".join(names[key] for key in order))
    return Path(output)
