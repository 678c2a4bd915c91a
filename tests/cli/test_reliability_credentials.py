"""Credentials in the environment never reach what a run saves or prints: a tiny VQGAN fit and a tokenize run with
fake AWS/Hugging Face keys set; every output file (configs, hparams, TensorBoard events, checkpoints, shards,
manifests) and the console are searched for them. Object storage paths do not exist yet (issue 17): until they do,
this is the environment-variable path alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FAKE = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKELVMPL0TEST42",
    "AWS_SECRET_ACCESS_KEY": "fAkE/sEcReT+lvmpl0123456789abcdefGHIJKLm",
    "AWS_SESSION_TOKEN": "FwoGZXIvYXdzFAKEsessionTOKENlvmpl",
    "HF_TOKEN": "hf_FakeTokenLvmPl0123456789abcdef",
}
SENTINEL = "sentinel_run_7f3a"  # saved on purpose (the run's name): shows the search reads each kind of file


def _main(repo: Path, cwd: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **FAKE, "PYTHONPATH": str(repo), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(repo / "main.py"), *args], cwd=cwd, env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return done


@pytest.mark.slow  # two `main.py` runs: ~25 s on 2 idle cores
def test_environment_credentials_reach_no_output(tmp_path, repo_root):
    configs = repo_root / "configs"
    data = ["-c", str(configs / "vqgan/tiny.yaml"), "-c", str(configs / "data/builtin.yaml")]
    data += ["--data.init_args.image_size=32", "--data.init_args.batch_size=4"]
    data += ["--data.init_args.source.init_args.splits={train: 8, val: 4, test: 4}"]
    fit = ["fit", *data, "--trainer.max_steps=2", "--trainer.max_time=null", "--trainer.limit_val_batches=1"]
    fit += ["--trainer.val_check_interval=2", f"--trainer.logger.init_args.name={SENTINEL}"]
    fit += [f"--trainer.callbacks.init_args.dirpath=runs/{SENTINEL}/checkpoints"]
    fit += ["--trainer.callbacks.init_args.every_n_train_steps=1", "--trainer.enable_progress_bar=false"]
    tokenize = ["predict", *data, "-c", str(configs / "tokenize.yaml"), "--data.init_args.max_images=4"]
    tokenize += [f"--ckpt_path=runs/{SENTINEL}/checkpoints/last.ckpt", "--trainer.callbacks.init_args.output_dir=tok"]
    console = [_main(repo_root, tmp_path, fit), _main(repo_root, tmp_path, tokenize)]

    outputs = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    kinds = {p.suffix for p in outputs}
    assert {".yaml", ".ckpt", ".json", ".bin", ".npz"} <= kinds, kinds  # configs, checkpoints, shards, manifests
    assert any(p.name.startswith("events.out.tfevents") for p in outputs)
    for suffix in (".yaml", ".ckpt"):  # the search can see text in these formats (torch.save stores uncompressed)
        assert any(SENTINEL.encode() in b for p, b in outputs.items() if p.suffix == suffix), suffix
    streams = {f"console {i}": s for i, run in enumerate(console) for s in (run.stdout, run.stderr)}
    for where, content in {**{str(p): b for p, b in outputs.items()}, **streams}.items():
        for name, value in FAKE.items():
            assert value.encode() not in content, f"{name} found in {where}"
