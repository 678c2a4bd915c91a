"""preview-data: one named grid row per sentence, grouped by kind and family; data configs (`-c`) load through it."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image

from datamodules.preview import load_datamodule
from datamodules.sources.builtin import FAMILIES
from lvm_pl.images import BAND
from main import main


def small_builtin(tmp_path, repo_root, **source_args) -> str:
    cfg = yaml.safe_load((repo_root / "configs/data/builtin.yaml").read_text())
    cfg["data"]["init_args"].update(image_size=16, num_workers=0)
    cfg["data"]["init_args"]["source"]["init_args"].update(source_args)
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_preview_writes_one_named_row_per_sentence_per_family(tmp_path, repo_root):
    cfg = small_builtin(tmp_path, repo_root, splits={"train": 0, "val": 300, "test": 0})
    main(["preview-data", "-c", cfg, "--output", "p.png", "--per_kind", "2"])
    img = np.asarray(Image.open("p.png").convert("RGB"))
    cell = 64 + 2  # 16 px frames shown at LABEL_CELL px (so the names fit beside them), 2 px padding
    rows = (img.shape[0] - 2 - BAND) // cell
    assert img.shape[0] == rows * cell + 2 + BAND  # the rows, then the caption band
    assert rows == 2 * len(FAMILIES)  # 300 sentences of the default mix hold every family at least twice
    margin = img.shape[1] - cell * ((img.shape[1] - 2) // cell) - 2  # left of the cells: the rows' names
    assert margin > 40
    for row in range(rows):  # every row has its name written beside it
        assert img[2 + row * cell : (row + 1) * cell, :margin].min() < 128, row
    assert img[-BAND:].min() < 128  # the caption


def test_every_shipped_data_config_builds(repo_root):
    for name in ("builtin", "folder", "video"):
        dm = load_datamodule([str(repo_root / f"configs/data/{name}.yaml")])
        assert dm.image_size > 0 and type(dm.source).__name__.lower().startswith(name[:5])


def test_later_configs_override_earlier(tmp_path, repo_root):
    override = tmp_path / "o.yaml"
    override.write_text("data:\n  init_args:\n    image_size: 24\n")
    dm = load_datamodule([str(repo_root / "configs/data/builtin.yaml"), str(override)])
    assert dm.image_size == 24 and dm.source.split_size("val") == 256


def test_bad_config_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  class_path: datamodules.VisualSentenceDataModule\n  init_args:\n    imagesize: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["preview-data", "--data", str(bad), "--output", "x.png"])  # the old spelling of -c
    assert exit_info.value.code == 2 and "bad.yaml" in capsys.readouterr().err
