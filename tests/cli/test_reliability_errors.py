"""Inputs that look bad but are not errors. Bad input through the command line is the table in
tests/cli/test_reliability_cli_table.py; the cases checked in other files are listed in docs/reliability.md."""

from __future__ import annotations

import numpy as np
import torch
import yaml
from PIL import Image

from datamodules.prompts import PromptDataModule


def test_prompt_images_of_mixed_sizes_are_resized_to_the_data_size(tmp_path):
    """Mixed sizes are not an error: every prompt image is resized (shorter side) and centre-cropped to
    `data.image_size`, smaller ones upscaled, so a batch is one [B, N, 3, S, S] tensor."""
    sizes = [(20, 24), (50, 30), (16, 16), (9, 13)]  # (height, width)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    entries = [{"images": ["0.png", "1.png"]}, {"images": ["2.png", "3.png", "1.png"]}]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(entries))
    dm = PromptDataModule(file=str(tmp_path / "p.yaml"), image_size=16, batch_size=2)
    dm.setup()
    batch = next(iter(dm.predict_dataloader()))
    assert batch.prompt.shape == (2, 3, 3, 16, 16) and batch.num_prompt.tolist() == [2, 3]
    # the content survives the resize: a flat image of value v stays v (in [-1, 1])
    assert torch.allclose(batch.prompt[1, 1], torch.full((3, 16, 16), 40 * 3 / 127.5 - 1))
