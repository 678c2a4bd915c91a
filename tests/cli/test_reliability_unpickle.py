"""Reading a file never runs its code: a checkpoint-shaped file whose unpickling would create a marker file goes
through every command that reads a checkpoint or weights, as the user types it. Each must leave no marker, exit 2
with no traceback, and end with one `error:` line naming the file. Adding a path is adding one row to CASES."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import lightning
import numpy as np
import pytest
import torch
from cli_runner import run_commands

from lvm_pl import shards
from lvm_pl.console import UserError
from lvm_pl.tokens import TokenLayout

LAYOUT = TokenLayout(codebook_size=32, tokens_per_image=4, num_special=4)
REFUSED = r"holds Python objects that weights_only loading refuses \(Unsupported global: .+\): lvm-pl never unpickles"


class _Touch:
    """Unpickles as `Path.touch(marker)`: the stand-in for a shell command in a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def plant(path: Path, marker: Path) -> Path:
    """A file shaped like a Lightning checkpoint (state_dict, hyper_parameters, version) carrying the payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "state_dict": {"model.tok_embeddings.weight": torch.zeros(LAYOUT.vocab_size, 32)},
        "hyper_parameters": {"_class_path": "lvm_pl.lvm.module.LVM", "model": "tiny", "note": _Touch(marker)},
        "pytorch-lightning_version": lightning.__version__,
        "global_step": 0,
    }
    torch.save(checkpoint, path)
    return path


def plant_all(case: Path) -> None:
    """In `case`: evil.ckpt, an HF directory whose weights are a pytorch_model.bin, a ZeRO checkpoint directory."""
    marker = case / "MARKER"
    plant(case / "evil.ckpt", marker)
    hf_config = {
        "model_type": "llama",
        "vocab_size": LAYOUT.vocab_size,
        "hidden_size": 32,
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "intermediate_size": 64,
        "lvm_layout": LAYOUT.to_dict(),
    }
    (case / "hf").mkdir()
    (case / "hf" / "config.json").write_text(json.dumps(hf_config))
    plant(case / "hf" / "pytorch_model.bin", marker)
    (case / "zero" / "checkpoint").mkdir(parents=True)
    (case / "zero" / "latest").write_text("checkpoint")
    plant(case / "zero" / "checkpoint" / "mp_rank_00_model_states.pt", marker)
    plant(case / "zero" / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    vq = {"_class_name": "VQModel", "block_out_channels": [32], "down_block_types": ["DownEncoderBlock2D"]}
    vq |= {"up_block_types": ["UpDecoderBlock2D"], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8}
    (case / "vq").mkdir()
    (case / "vq" / "config.json").write_text(json.dumps(vq | {"num_vq_embeddings": 16}))  # a diffusers VQModel dir
    plant(case / "vq" / "diffusion_pytorch_model.bin", marker)


class Case(NamedTuple):
    """A command as typed (`main.py ...` or `-m bench...`, run by this Python in the case's folder) and what its one
    error line must hold. {evil}: the planted checkpoint; {dir}: the case's folder; {c}: configs/; {data}: shards."""

    name: str
    command: str
    names: str = "{evil}"  # the file (or folder) the error line must name
    why: str = REFUSED


VQGAN = "-c {c}/vqgan/tiny.yaml -c {c}/data/builtin.yaml"
LVM = "-c {c}/lvm/tiny.yaml --data.train={data} --data.val={data} --data.seq_len=8"
LVM_TEST = "-c {c}/lvm/tiny.yaml -c {c}/data/tokens_eval.yaml --data.test={data}"
GENERATE = "-c {c}/generate.yaml --trainer.accelerator=cpu --data.init_args.limit=1"

CASES = [
    Case("vqgan_fit_ckpt_path", f"main.py fit {VQGAN} --ckpt_path={{evil}}"),
    Case("vqgan_test_ckpt_path", f"main.py test {VQGAN} --ckpt_path={{evil}}"),
    Case("vqgan_predict_ckpt_path", f"main.py predict {VQGAN} -c {{c}}/tokenize.yaml --ckpt_path={{evil}}"),
    Case("lvm_fit_ckpt_path", f"main.py fit {LVM} --ckpt_path={{evil}}"),
    Case("lvm_test_ckpt_path", f"main.py test {LVM_TEST} --ckpt_path={{evil}}"),
    Case("lvm_predict_ckpt_path", f"main.py predict {GENERATE} --ckpt_path={{evil}}"),
    Case("lvm_init_from", f"main.py fit {LVM} --model.init_args.init_from={{evil}}"),
    Case("lvm_fit_tokenizer", "main.py fit -c {c}/lvm/tiny.yaml -c {c}/data/builtin.yaml --model.tokenizer={evil}"),
    Case("lvm_test_tokenizer", f"main.py test {LVM_TEST} --model.init_args.tokenizer={{evil}}"),
    Case("lvm_predict_tokenizer", f"main.py predict {GENERATE} --model.init_args.tokenizer={{evil}}"),
    Case("export_hf", "main.py export-hf --checkpoint={evil} --out_dir=out"),
    Case("import_hf_bin", "main.py import-hf --hf_dir={dir}/hf --out=o.ckpt", "{dir}/hf/pytorch_model.bin"),
    Case("import_vqgan_bin", "main.py import-vqgan --source_dir={dir}/vq --out=o.ckpt", "{dir}/vq/diffusion_pytorch_"),
    Case("convert_zero", "main.py convert-zero --checkpoint_dir={dir}/zero --out=o.ckpt", "{dir}/zero/checkpoint/"),
    Case("bench_tokens_vqgan", "-m bench.bench_tokens --quick --vqgan={evil}"),
]


def _where(case: Case, root: Path, repo: Path) -> dict[str, str]:
    where = {"dir": str(root / case.name), "c": str(repo / "configs"), "data": str(root / "data")}
    where["evil"] = f"{where['dir']}/evil.ckpt"
    return where


def _env(where: dict[str, str], repo: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(repo), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return env | {"BENCH_RESULTS_DIR": f"{where['dir']}/bench"}


def _run(case: Case, root: Path, repo: Path) -> subprocess.CompletedProcess:
    """A command that is not `main.py` (a bench module), as its own `python -m ...` process."""
    where = _where(case, root, repo)
    argv = [sys.executable, *shlex.split(case.command.format(**where))]
    return subprocess.run(argv, cwd=where["dir"], env=_env(where, repo), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, repo_root) -> dict[str, tuple[subprocess.CompletedProcess, dict[str, str]]]:
    """Every selected case run once, in its own planted folder: the `main.py` ones as forked children of one warm
    process that runs `main.py` as `__main__` (tests/cli_runner.py: the imports paid once), the others as processes."""
    params = [item.callspec.params for item in request.session.items if hasattr(item, "callspec")]
    cases = [case for case in CASES if any(p.get("case") == case for p in params)]  # `-k convert_zero` runs one
    root = tmp_path_factory.mktemp("unpickle")
    rng = np.random.default_rng(0)
    shards.write_split(root / "data", "train", LAYOUT, [rng.integers(0, 32, size=(2, 4)) for _ in range(6)])
    shards.write_split(root / "data", "test", LAYOUT, [rng.integers(0, 32, size=(2, 4)) for _ in range(6)])
    for case in cases:
        plant_all(root / case.name)
    cli = [case for case in cases if case.command.startswith("main.py ")]
    with ThreadPoolExecutor(max_workers=1) as pool:
        others = {case.name: pool.submit(_run, case, root, repo_root) for case in cases if case not in cli}
        commands = []
        for case in cli:
            where = _where(case, root, repo_root)
            argv = shlex.split(case.command.format(**where))[1:]
            commands.append({"argv": argv, "cwd": where["dir"], "env": _env(where, repo_root)})
        done = run_commands(commands, parallel=3) if commands else []
        out = {
            case.name: subprocess.CompletedProcess(c["argv"], r["rc"], r["stdout"], r["stderr"])
            for case, c, r in zip(cli, commands, done, strict=True)
        }
        out |= {name: future.result() for name, future in others.items()}
    return {
        name: (result, _where(next(c for c in cases if c.name == name), root, repo_root))
        for name, result in out.items()
    }


def test_the_planted_file_runs_code_when_unpickled(tmp_path):
    """The fixture is real: a plain `torch.load(weights_only=False)` of it creates the marker."""
    plant(tmp_path / "evil.ckpt", tmp_path / "MARKER")
    torch.load(tmp_path / "evil.ckpt", weights_only=False)
    assert (tmp_path / "MARKER").exists()


@pytest.mark.slow  # 14 `main.py` commands forked from one warm process and one bench process: ~40 s on 2 cores
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_code_carrying_file_is_refused_by_name(runs, case):
    done, where = runs[case.name]
    err = done.stderr
    assert not Path(where["dir"], "MARKER").exists(), f"{case.name}: the file's code ran\n{err[-3000:]}"
    assert done.returncode == 2, f"{case.name}: rc={done.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err, f"{case.name}:\n{err[-3000:]}"
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == lines[-1:], f"{case.name}: stderr ends {lines[-3:]}"
    assert case.names.format(**where) in errors[0], f"{case.name}: {errors[0]}"
    assert re.search(case.why, errors[0]), f"{case.name}: {errors[0]}"


def test_checkpoint_io_reads_weights_only_whoever_asks(tmp_path):
    """The Trainer's reads (`fit/validate/test/predict --ckpt_path`, after LightningCLI's own) ignore a caller's
    `weights_only=False`."""
    from lvm_pl.checkpoint_io import AtomicCheckpointIO

    plant(tmp_path / "evil.ckpt", tmp_path / "MARKER")
    with pytest.raises(UserError, match=r"^ckpt_path=.*evil.ckpt: " + REFUSED):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "evil.ckpt", weights_only=False)
    assert not (tmp_path / "MARKER").exists()
    (tmp_path / "noise.ckpt").write_bytes(b"not a checkpoint")  # no pickle at all: unreadable, not "objects"
    with pytest.raises(UserError, match=r"^ckpt_path=.*noise.ckpt: not a readable checkpoint \(.+\)$"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "noise.ckpt")


def test_weights_only_loads_overrides_a_library_asking_for_pickle(tmp_path, monkeypatch):
    """What main() wraps every command in: DeepSpeed's and any library's `torch.load(weights_only=False)` included."""
    from lvm_pl.safe_load import weights_only_loads

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # a user's setting cannot reopen the door
    plant(tmp_path / "evil.ckpt", tmp_path / "MARKER")
    with weights_only_loads(), pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(tmp_path / "evil.ckpt", weights_only=False)
    assert not (tmp_path / "MARKER").exists()
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") == "1"  # restored after
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_a_deepspeed_trainer_allows_deepspeed_state_types(tmp_path, repo_root):
    """Resuming a ZeRO directory is DeepSpeed's own torch.load, forced weights-only: the CLI allows DeepSpeed's plain
    data types once its Trainer uses the DeepSpeed strategy (a real run needs CUDA; the Trainer builds on CPU)."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from main import cli

    torch.save({"zero_stage": ZeroStageEnum(2)}, tmp_path / "optim.pt")
    shards.write_split(tmp_path / "data", "train", LAYOUT, [np.zeros((2, 4), dtype=np.int64)] * 4)
    configs = repo_root / "configs"
    args = ["-c", str(configs / "lvm/tiny.yaml"), "-c", str(configs / "trainer/deepspeed_zero2.yaml")]
    args += [f"--data.train={tmp_path / 'data'}", "--data.val=null", "--trainer.accelerator=cpu", "--trainer.devices=1"]
    args += ["--trainer.precision=32-true", "--trainer.logger=false"]
    before = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()  # as in a fresh process (another test's CLI may have added them)
    try:
        with pytest.raises(pickle.UnpicklingError):  # not allowed by default
            torch.load(tmp_path / "optim.pt", weights_only=True)
        cli(args, run=False)
        assert torch.load(tmp_path / "optim.pt", weights_only=True)["zero_stage"] == ZeroStageEnum(2)
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)
