"""Every YAML under configs/ resolves through the command its own header documents.

Each config carries a usage line (the first comment line that starts with `python main.py`, continued by lines ending
in a backslash). tests/cli/test_documented_commands.py runs every such line as written (tiny); here each Trainer
usage line resolves (`--print_config`), in a working directory where the paths configs use by default
(`data/tokens/*`, `data/images`, `data/videos`, `data/shards`, `prompts.yaml`, `prompts/`) hold tiny real inputs, with
checkpoint paths pointed at tiny checkpoints made by the real CLI (tests/conftest.py:tiny_assets), plus tiny overrides:
small images and splits, no workers, `fast_dev_run`. GPU-only trainers (accelerator gpu, DeepSpeed, FSDP) run their
strategy in the `gpu` tests. A config added later is covered without touching this file.
"""

from __future__ import annotations

import importlib
import re

import pytest
import torch
import yaml
from helpers import REPO as ROOT
from helpers import compose, config_files, usage

from main import cli, main


def _trainer_usage(rel: str) -> bool:
    try:
        return usage(rel)[0] in ("fit", "validate", "test", "predict")
    except AssertionError:  # no usage line: the tests below report it
        return True


# configs whose usage is another command (`tokenize`: configs/tokenize.yaml, configs/data/video.yaml) run only in
# tests/cli/test_documented_commands.py
CONFIGS = [
    c for c in sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml")) if _trainer_usage(c)
]


def is_subclass(path: str | None, base: str) -> bool:
    if not path:
        return False
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    base_module, _, base_name = base.rpartition(".")
    return issubclass(cls, getattr(importlib.import_module(base_module), base_name))


def needs_gpu(trainer: dict) -> bool:
    strategy = trainer.get("strategy")
    name = strategy.get("class_path", "") if isinstance(strategy, dict) else str(strategy or "")
    return trainer.get("accelerator") in ("gpu", "cuda") or any(s in name.lower() for s in ("deepspeed", "fsdp"))


def tiny(rel: str, assets: dict, gpu: bool = False) -> list[str]:
    """The config's usage command, made tiny and pointed at the fixtures."""
    argv = usage(rel)
    files = config_files(argv)
    assert rel in files, f"{rel}: its usage line does not use it"
    cfg = compose(files)
    model_path = (cfg.get("model") or {}).get("class_path")
    is_lvm = is_subclass(model_path, "lvm_pl.lvm.module.LVM")
    args, i = [], 0
    while i < len(argv):  # point checkpoints at the fixtures, configs at the repo
        a = argv[i]
        if a in ("-c", "--config"):
            args += [a, str(ROOT / config_files([a, argv[i + 1]])[0])]
            i += 2
        elif a in ("--ckpt_path", "--model.tokenizer", "--model.init_args.tokenizer"):
            ckpt = assets["lvm_ckpt"] if a == "--ckpt_path" and is_lvm else assets["vqgan_ckpt"]
            args += [a, str(ckpt)]
            i += 2
        else:
            args.append(a)
            i += 1
    data = (cfg.get("data") or {}).get("init_args") or {}
    if "num_workers" in data:
        args.append("--data.init_args.num_workers=0")
    if "image_size" in data or (data.get("source") or {}).get("class_path"):
        args.append("--data.init_args.image_size=32")  # the fixture tokenizer and LVM were made at 32 px
    if "batch_size" in data:
        args.append("--data.init_args.batch_size=2")
    source = data.get("source") or {}
    if str(source.get("class_path", "")).endswith("BuiltinSource"):
        args.append("--data.init_args.source.init_args.splits={train: 8, val: 4, test: 4}")
    if str(source.get("class_path", "")).endswith("VideoSource"):
        args += [
            "--data.init_args.source.init_args.length=4",
            "--data.init_args.source.init_args.stride=4",
            "--data.init_args.min_images=4",
            "--data.init_args.max_images=4",
        ]
    for key in _keys(cfg.get("model"), "--model", "pretrained"):
        args.append(f"{key}=false")  # the VGG16 backbone is not shipped: random features offline
    if needs_gpu(cfg.get("trainer") or {}) and not gpu:
        args += [
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.strategy=auto",
            "--trainer.precision=32-true",
        ]
        if is_lvm:  # the tiny preset; the vocabulary comes from the fixture shards' layout
            args += ["--model.init_args.preset=tiny"]
    elif gpu:
        args += ["--trainer.devices=1"]
    return [*args, "--trainer.fast_dev_run=1"]


def _keys(block, prefix: str, key: str):
    """Dotted override paths of every `key` inside a YAML block (e.g. each `pretrained` flag)."""
    if isinstance(block, dict):
        for k, v in block.items():
            path = f"{prefix}.{k}"
            if k == key:
                yield path
            yield from _keys(v, path, key)


@pytest.fixture
def workdir(tiny_assets, tmp_path, monkeypatch):
    """A working directory whose default data paths hold the tiny fixtures."""
    links = {
        "data/tokens/train": tiny_assets["shards"] / "train",
        "data/tokens/val": tiny_assets["shards"] / "val",
        "data/tokens/test": tiny_assets["shards"] / "val",
        "data/tokens_long/train": tiny_assets["shards"] / "train",  # configs/demo/lvm_long.yaml's shards
        "data/tokens_long/val": tiny_assets["shards"] / "val",
        "data/stream/train": tiny_assets["stream"] / "train",  # configs/data/tokens_stream.yaml's
        "data/stream/val": tiny_assets["stream"] / "val",
        "data/images": tiny_assets["folder"],
        "data/videos": tiny_assets["videos"],
        "data/shards": tiny_assets["tar"],
        "prompts.yaml": tiny_assets["prompts_file"],
        "prompts": tiny_assets["prompts_folder"],
    }
    for name, target in links.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).symlink_to(target)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("rel", CONFIGS)
def test_config_prints_its_resolved_config(rel, tiny_assets, workdir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli([*tiny(rel, tiny_assets), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    printed = yaml.safe_load(out[re.search(r"^(# |[a-z_]+:)", out, re.M).start() :])  # skip lines logged before it
    assert printed["model"]["class_path"] and printed["data"]["class_path"] and "trainer" in printed


def _gpu_only(rel: str) -> bool:
    try:
        return needs_gpu(compose(config_files(usage(rel))).get("trainer") or {})
    except AssertionError:  # no usage line: the CPU tests above report it
        return False


GPU_CONFIGS = [c for c in CONFIGS if _gpu_only(c)]


@pytest.mark.gpu
@pytest.mark.parametrize("rel", GPU_CONFIGS)
def test_gpu_config_runs_its_strategy(rel, tiny_assets, workdir):
    assert torch.cuda.is_available()
    cli(tiny(rel, tiny_assets, gpu=True))


def test_typo_in_a_config_key_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "typo.yaml"
    bad.write_text("model:\n  class_path: lvm_pl.lvm.module.LVM\n  init_args:\n    learning_rate_typo: 0.1\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(ROOT / "configs/data/tokens.yaml"), "-c", str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {bad}:4: model.init_args.learning_rate_typo: no such key" in err and "Traceback" not in err
