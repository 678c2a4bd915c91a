"""The optimizer follows the strategy: every config's optimizer, built against the strategy its usage line composes,
is one DeepSpeed accepts; DeepSpeed's CPU Adam builds here and steps like AdamW; the shared warmup-cosine schedule.

DeepSpeed's CPU Adam is a C++ op built on first use (about 2-4 minutes on 2 busy cores); `make install` builds it
into the venv's TORCH_EXTENSIONS_DIR (the Makefile's), so the tests load it in a second.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import REPO as ROOT
from helpers import compose, config_files, usage
from jsonargparse import ArgumentParser
from lightning.pytorch import Trainer

from lvm_pl.lvm.module import LVM
from lvm_pl.optim import adamw, offloads_optimizer, warmup_cosine
from lvm_pl.tokens import TokenLayout
from lvm_pl.vqgan.module import VQGAN

STAGE_CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("[lv][vq]*/*.yaml"))
SMALL = dict(n_embd=32, n_layer=1, n_head=2, n_query_groups=2, intermediate_size=32, block_size=64)


def deepspeed_refusal(strategy, optimizer: torch.optim.Optimizer) -> str | None:
    """Why DeepSpeed 0.19's engine would refuse `optimizer` under `strategy` (its `_configure_optimizer` rule:
    ZeRO-Offload with `zero_force_ds_cpu_optimizer` needs DeepSpeedCPUAdam/Lion), read by DeepSpeed's own config."""
    if not isinstance(getattr(strategy, "config", None), dict):
        return None
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from deepspeed.ops.lion import DeepSpeedCPULion
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = DeepSpeedConfig({**strategy.config, "train_micro_batch_size_per_gpu": 1})
    offload = ds.zero_config.offload_optimizer
    if offload is None or offload.device not in ("cpu", "nvme") or not ds.zero_force_ds_cpu_optimizer:
        return None
    if isinstance(optimizer, (DeepSpeedCPUAdam, DeepSpeedCPULion)):
        return None
    return f"ZeRO-Offload (device {offload.device}) with {type(optimizer).__name__}"


def strategy_of(trainer: dict):
    """The strategy a config's trainer section names, instantiated as the CLI would (a class_path or a name)."""
    strategy = trainer.get("strategy", "auto")
    if isinstance(strategy, dict):
        module, _, name = strategy["class_path"].rpartition(".")
        return getattr(importlib.import_module(module), name)(**strategy.get("init_args", {}))
    return strategy


def stage_module(model: dict) -> torch.nn.Module:
    """The config's LightningModule with its own optimizer settings (the LVM at a small shape: same groups)."""
    init_args = dict(model.get("init_args") or {})
    if model["class_path"].endswith(".LVM"):
        layout = TokenLayout.for_images(64, 16, 4).to_dict()
        module = LVM(**{**init_args, "layout": layout, "overrides": SMALL, "compile": False})
        module.configure_model()
        return module
    parser = ArgumentParser()
    parser.add_argument("--model", type=VQGAN)
    with torch.device("meta"):  # the paper-size tokenizers: building the optimizer never touches the weights
        return parser.instantiate(parser.parse_object({"model": model})).model


@pytest.mark.parametrize("rel", STAGE_CONFIGS)
def test_every_config_builds_an_optimizer_its_strategy_accepts(rel):
    cfg = compose(config_files(usage(rel)))
    strategy = strategy_of(cfg.get("trainer") or {})
    module = stage_module(cfg["model"])
    module.trainer = Trainer(accelerator="cpu", strategy=strategy, max_steps=10, logger=False)
    optimizer = module.configure_optimizers()["optimizer"]
    assert deepspeed_refusal(strategy, optimizer) is None, f"{rel}: DeepSpeed would refuse it"


def test_the_check_catches_plain_adamw_under_offload():
    """Today's bug, shown to fail the check above: torch AdamW with the offload trainer config."""
    strategy = strategy_of(compose(["configs/trainer/deepspeed_zero3_offload.yaml"])["trainer"])
    assert offloads_optimizer(strategy)
    plain = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    assert deepspeed_refusal(strategy, plain) == "ZeRO-Offload (device cpu) with AdamW"
    assert not offloads_optimizer(strategy_of(compose(["configs/trainer/deepspeed_zero3.yaml"])["trainer"]))


def test_deepspeed_cpu_adam_steps_like_adamw():
    """One real step of DeepSpeed's CPU Adam (its C++ op built here) against torch AdamW, same groups and settings."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    strategy = strategy_of(compose(["configs/trainer/deepspeed_zero3_offload.yaml"])["trainer"])
    torch.manual_seed(0)
    weights, grads = [torch.randn(64, 32), torch.randn(32)], [torch.randn(64, 32), torch.randn(32)]
    results = []
    settings = dict(lr=1e-2, betas=(0.9, 0.95))
    for build in (lambda g: adamw(g, strategy, **settings), lambda g: torch.optim.AdamW(g, **settings)):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        optimizer = build([{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}])
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
        results.append((optimizer, params))
    (cpu_adam, stepped), (_, reference) = results
    assert isinstance(cpu_adam, DeepSpeedCPUAdam)
    for p, ref, w in zip(stepped, reference, weights, strict=True):
        assert not torch.equal(p, w)
        torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_adamw_is_fused_on_cuda():
    params = [torch.nn.Parameter(torch.zeros(4, device="cuda"))]
    assert adamw([{"params": params}], "ddp", lr=1e-3).defaults["fused"] is True


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 110, 0.2) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110, 0.2) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.2) == pytest.approx(0.6)  # half-way down the cosine: (1 + 0.2) / 2
    assert warmup_cosine(110, 10, 110, 0.2) == pytest.approx(0.2)
    assert warmup_cosine(10_000, 10, 110, 0.2) == pytest.approx(0.2)
