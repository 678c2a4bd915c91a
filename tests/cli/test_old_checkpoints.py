"""Checkpoints and configs from before the contracts redesign (flat `LVM(model=..., lr=...)` arguments).

tests/fixtures/pre_contracts/ holds a tiny VQGAN, its token shards and an LVM written by that code (see its README):
they load, train on, and predict through today's CLI; old config keys are refused with one line naming the new key.
"""

from __future__ import annotations

import pytest
import torch

FIXTURES = "tests/fixtures/pre_contracts"
SMALL = "--model.init_args.overrides={block_size: 128, n_embd: 32, n_layer: 1, n_head: 2, intermediate_size: 64}"


@pytest.fixture()
def run(main_py):
    """`python main.py args` (the repository given first, as the tests read it)."""
    return lambda repo_root, *args: main_py(list(args))


@pytest.fixture()
def old(repo_root):
    return repo_root / FIXTURES


def test_old_lvm_checkpoint_resumes_one_step(run, repo_root, old, tmp_path):
    out = run(
        repo_root,
        "fit",
        "-c",
        str(repo_root / "configs/lvm/tiny.yaml"),
        "-c",
        str(repo_root / "configs/data/tokens.yaml"),
        f"--data.init_args.train={old / 'shards/train'}",
        f"--data.init_args.val={old / 'shards/val'}",
        "--data.init_args.seq_len=128",
        "--data.init_args.batch_size=2",
        SMALL,
        "--trainer.max_steps=3",
        "--trainer.limit_val_batches=0",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks=[{class_path: lightning.pytorch.callbacks.ModelCheckpoint,"
        f" init_args: {{dirpath: {tmp_path / 'ck'}, save_last: true}}}}]",
        f"--ckpt_path={old / 'lvm.ckpt'}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Restored all states" in out.stdout + out.stderr
    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3  # the old checkpoint was at step 2: exactly one more step was trained
    hp = saved["hyper_parameters"]
    assert hp["preset"] == "tiny" and hp["optim"]["lr"] == 1e-3 and "model" not in hp and "lr" not in hp
    assert hp["layout"]["codebook_size"] == 16


def test_old_lvm_checkpoint_predicts_with_old_tokenizer(run, repo_root, old, tmp_path):
    out = run(
        repo_root,
        "predict",
        "-c",
        str(repo_root / "configs/generate.yaml"),
        f"--ckpt_path={old / 'lvm.ckpt'}",
        f"--model.init_args.tokenizer={old / 'vqgan.ckpt'}",
        "--model.init_args.generation.num_candidates=1",
        "--model.init_args.generation.temperature=0",
        "--data.init_args.image_size=16",
        "--data.init_args.limit=2",
        "--data.init_args.num_frames=1",
        "--data.init_args.source.init_args.splits={train: 0, val: 8, test: 0}",
        "--data.init_args.source.init_args.sequence_length=[2, 3]",
        "--trainer.logger=false",
        f"--trainer.callbacks.init_args.output_dir={tmp_path / 'gen'}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    grids = sorted((tmp_path / "gen").glob("*.png"))
    assert len(grids) == 2, out.stdout[-2000:]


@pytest.mark.parametrize(
    ("flag", "new"),
    [
        ("--model.init_args.lr=0.1", "model.init_args.optim.lr"),
        ("--model.init_args.model=300m", "model.init_args.preset"),
        ("--model.init_args.context_frames=3", "model.init_args.evaluation.context_frames"),
        ("--model.init_args.vocab_size=8292", "the vocabulary comes from the token layout"),
    ],
)
def test_old_config_keys_name_the_new_key(run, repo_root, flag, new):
    out = run(repo_root, "fit", "-c", str(repo_root / "configs/lvm/tiny.yaml"), flag, "--print_config")
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and new in lines[0] and flag.split("=")[0] in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_old_config_file_names_the_file_and_new_key(run, repo_root, tmp_path):
    old_yaml = tmp_path / "old.yaml"
    old_yaml.write_text("model:\n  class_path: lvm_pl.lvm.module.LVM\n  init_args:\n    model: tiny\n    lr: 0.1\n")
    out = run(repo_root, "fit", "-c", str(old_yaml), "-c", str(repo_root / "configs/data/tokens.yaml"))
    assert out.returncode == 2
    assert f"error: {old_yaml}: model.init_args.lr is no longer an LVM argument; use model.init_args.optim.lr" in (
        out.stderr
    )


def test_old_lvm_checkpoint_loads_in_python(old):
    from lvm_pl.lvm.module import LVM

    model = LVM.load_from_checkpoint(old / "lvm.ckpt")
    assert model.hparams.preset == "tiny" and model.optim.lr == 1e-3 and model.config.n_embd == 32
    assert model.layout.codebook_size == 16 and model.model is not None
