"""Every configs/lvm/*.yaml parses against the real signatures and builds its model (meta device) on CPU."""

from __future__ import annotations

import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch import LightningModule, Trainer

from lvm_pl.console import UserError
from lvm_pl.lvm.module import LVM
from lvm_pl.tokens import TokenLayout

PAPER = {"100m": 2, "300m": 2, "600m": 2, "1b": 2, "3b": 3, "7b": 3, "3b_offload": 3, "7b_offload": 3}
PARAMS = {"100m": 116_974_720, "300m": 290_968_576, "600m": 648_396_288, "1b": 1_147_119_616}
PARAMS |= {"3b": 3_274_742_400, "7b": 6_544_199_680}


def parse(path):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Trainer, "trainer", fail_untyped=False)
    parser.add_subclass_arguments(LightningModule, "model")
    parser.add_argument("--data", type=dict | None, default=None)
    return parser.parse_path(str(path))


def build(cfg, layout: TokenLayout) -> LVM:
    module = LVM(**{**cfg.model.init_args.as_dict(), "layout": layout.to_dict()})
    with torch.device("meta"):
        module.configure_model()
    return module


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_parse_and_build(repo_root, name):
    cfg = parse(repo_root / f"configs/lvm/{name}.yaml")
    hp = cfg.model.init_args
    recipe = (hp.lr, hp.min_lr, hp.warmup_steps, tuple(hp.betas), hp.weight_decay)
    assert recipe == (1.5e-4, 3e-5, 8000, (0.9, 0.95), 0.1)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.gradient_clip_val == 1.0
    strategy = cfg.trainer.strategy
    assert strategy.class_path.endswith("DeepSpeedStrategy") and strategy.init_args.stage == PAPER[name]
    assert strategy.init_args.offload_optimizer == name.endswith("offload")
    model = build(cfg, TokenLayout.for_images(8192, 256, 16)).model
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name.split("_")[0]]


def test_paper_configs_reject_a_mismatched_tokenizer(repo_root):
    cfg = parse(repo_root / "configs/lvm/300m.yaml")
    with pytest.raises(UserError, match="vocab_size=8292"):
        build(cfg, TokenLayout.for_images(1024, 256, 16))


def test_tiny_config_parses_and_builds(repo_root):
    cfg = parse(repo_root / "configs/lvm/tiny.yaml")
    assert cfg.trainer.accelerator == "cpu"
    model = build(cfg, TokenLayout(codebook_size=32, tokens_per_image=4)).model
    assert model.config.vocab_size == 132 and model.config.n_embd == 128
