"""Every VQGAN config, composed as its usage line says, parses against the module's signature and builds (paper
sizes on the meta device)."""

import pytest
import torch
from helpers import compose, config_files, usage
from jsonargparse import ArgumentParser

from lvm_pl.vqgan.module import VQGAN


def _build(name: str):
    files = config_files(usage(f"configs/vqgan/{name}.yaml"))
    assert f"configs/vqgan/{name}.yaml" in files
    parser = ArgumentParser()
    parser.add_argument("--model", type=VQGAN)
    cfg = parser.parse_object({"model": compose(files)["model"]})
    with torch.device("meta"):
        return parser.instantiate(cfg).model


@pytest.mark.parametrize(
    "name,blocks,latent",
    [("muse_f16_8192", [128, 256, 256, 512, 768], 64), ("maskgit_f16_8192", [128, 128, 256, 256, 512], 256)],
)
def test_paper_configs_build(name, blocks, latent):
    model = _build(name)
    assert model.codebook_size == 8192 and model.downsample_factor == 16
    ae = model.autoencoder
    assert [b.resnets[0].conv1.out_channels for b in ae.encoder.down_blocks] == blocks
    assert all(len(b.resnets) == 3 for b in ae.decoder.up_blocks)  # layers_per_block + 1
    assert ae.encoder.mid_block.attentions is None and ae.encoder.conv_out.out_channels == latent
    assert model.loss.perceptual is not None and model.loss.perceptual.pretrained


def test_tiny_config_builds():
    model = _build("tiny")
    assert model.downsample_factor == 4 and model.loss.perceptual is None
