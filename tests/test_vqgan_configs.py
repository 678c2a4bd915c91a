"""Every VQGAN config parses against the module's signature and builds (paper sizes on the meta device)."""

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

from lvm_pl.vqgan.module import VQGAN


def _build(path):
    parser = ArgumentParser()
    parser.add_argument("--model", type=VQGAN)
    cfg = parser.parse_object({"model": yaml.safe_load(path.read_text())["model"]})
    with torch.device("meta"):
        return parser.instantiate(cfg).model


@pytest.mark.parametrize(
    "name,blocks,latent",
    [("muse_f16_8192", [128, 256, 256, 512, 768], 64), ("maskgit_f16_8192", [128, 128, 256, 256, 512], 256)],
)
def test_paper_configs_build(repo_root, name, blocks, latent):
    model = _build(repo_root / f"configs/vqgan/{name}.yaml")
    assert model.codebook_size == 8192 and model.downsample_factor == 16
    ae = model.autoencoder
    assert [b.resnets[0].conv1.out_channels for b in ae.encoder.down_blocks] == blocks
    assert all(len(b.resnets) == 3 for b in ae.decoder.up_blocks)  # layers_per_block + 1
    assert ae.encoder.mid_block.attentions is None and ae.encoder.conv_out.out_channels == latent
    assert model.loss.perceptual is not None and model.loss.perceptual.pretrained


def test_tiny_config_builds(repo_root):
    model = _build(repo_root / "configs/vqgan/tiny.yaml")
    assert model.downsample_factor == 4 and model.loss.perceptual is None
