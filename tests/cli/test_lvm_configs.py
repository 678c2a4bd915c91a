"""Every configs/lvm/*.yaml, composed as its usage line says, parses against the real signatures and builds its
model (meta device) on CPU."""

from __future__ import annotations

import pytest
import torch
import yaml
from helpers import REPO, config_files, usage
from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch import LightningModule, Trainer

from lvm_pl.lvm.module import LVM
from lvm_pl.tokens import TokenLayout

PAPER = {"100m": 2, "300m": 2, "600m": 2, "1b": 2, "3b": 3, "7b": 3, "3b_offload": 3, "7b_offload": 3}
PARAMS = {"100m": 116_974_720, "300m": 290_968_576, "600m": 648_396_288, "1b": 1_147_119_616}
PARAMS |= {"3b": 3_274_742_400, "7b": 6_544_199_680}


def parse(name: str):
    """configs/lvm/<name>.yaml with the files its usage line composes it with, in that order."""
    files = config_files(usage(f"configs/lvm/{name}.yaml"))
    assert f"configs/lvm/{name}.yaml" in files
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("-c", "--config", action=ActionConfigFile)
    parser.add_class_arguments(Trainer, "trainer", fail_untyped=False)
    parser.add_subclass_arguments(LightningModule, "model")
    parser.add_argument("--data", type=dict | None, default=None)
    return parser.parse_args([arg for f in files for arg in ("-c", str(REPO / f))])


def build(cfg, layout: TokenLayout) -> LVM:
    module = LVM(**{**cfg.model.init_args.as_dict(), "layout": layout.to_dict()})
    with torch.device("meta"):
        module.configure_model()
    return module


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_parse_and_build(name):
    cfg = parse(name)
    optim = cfg.model.init_args.optim
    recipe = (optim.lr, optim.min_lr, optim.warmup_steps, tuple(optim.betas), optim.weight_decay)
    assert recipe == (1.5e-4, 3e-5, 8000, (0.9, 0.95), 0.1)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.gradient_clip_val == 1.0
    strategy = cfg.trainer.strategy
    assert strategy.class_path.endswith("DeepSpeedStrategy") and strategy.init_args.stage == PAPER[name]
    assert strategy.init_args.offload_optimizer == name.endswith("offload")
    assert cfg.model.init_args.preset == name.split("_")[0]
    model = build(cfg, TokenLayout.for_images(8192, 256, 16)).model
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name.split("_")[0]]


def test_paper_configs_take_the_vocabulary_from_the_token_layout(repo_root):
    for path in (repo_root / "configs/lvm").glob("*.yaml"):  # no size pins a vocabulary the tokenizer may contradict
        init_args = (yaml.safe_load(path.read_text()).get("model") or {}).get("init_args") or {}
        assert "vocab_size" not in init_args and "vocab_size" not in (init_args.get("overrides") or {}), path
    cfg = parse("300m")
    for codebook in (8192, 1024):
        layout = TokenLayout.for_images(codebook, 256, 16)
        assert build(cfg, layout).config.vocab_size == layout.vocab_size == codebook + 100


def test_tiny_config_parses_and_builds():
    cfg = parse("tiny")
    assert cfg.trainer.accelerator == "cpu"
    model = build(cfg, TokenLayout(codebook_size=32, tokens_per_image=4)).model
    assert model.config.vocab_size == 132 and model.config.n_embd == 128
