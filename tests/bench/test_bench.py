"""Benchmarks cannot rot: every bench script's --quick mode runs and writes figures; `python -m bench` tabulates them.

Figures are not checked against aims (benchmarks never gate CI); only that they exist, are positive and well-formed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO as ROOT

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # bench/ is a folder of scripts, not an installed package

from bench import common  # noqa: E402
from bench.__main__ import discover, main, parse_flags, row, table  # noqa: E402
from lvm_pl.console import UserError  # noqa: E402

# bench_tokens runs through `python -m bench` below, so its quick mode is not paid for twice
VIA_MAIN = "bench_tokens"


def run_quick(warm_cli, module: str, args: list[str], results: Path) -> subprocess.CompletedProcess:
    """`python -m module args --quick`, forked from the warm server (tests/cli_runner.py: imports paid once)."""
    env = {**os.environ, "BENCH_RESULTS_DIR": str(results)}
    return warm_cli.run([*args, "--quick"], cwd=ROOT, env=env, timeout=600, module=module)


def check_figures(figures: list[dict]) -> None:
    assert figures
    for fig in figures:
        assert fig["name"] and fig["unit"]
        for key in ("ours", "reference"):
            value = fig.get(key)
            assert value is None or (math.isfinite(value) and value > 0), (fig["name"], key, value)


@pytest.mark.slow  # a benchmark's quick run: 15-70 s on 2 cores
@pytest.mark.parametrize("script", [s for s in discover() if s != VIA_MAIN])
def test_quick_mode_writes_figures(script, tmp_path, warm_cli):
    proc = run_quick(warm_cli, f"bench.{script}", [], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_figures(json.loads((tmp_path / f"{script}.json").read_text())["figures"])


@pytest.mark.slow  # a benchmark's quick run: 15-70 s on 2 cores
def test_make_bench_prints_one_table_and_writes_summary(tmp_path, warm_cli):
    proc = run_quick(warm_cli, "bench", ["--only", VIA_MAIN.removeprefix("bench_")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| figure" in proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["quick"] and summary["header"]["versions"]["torch"] == torch.__version__
    (loader,) = [r for r in summary["rows"] if r["name"] == "packed loader tokens/s"]
    assert loader["met"] == (loader["ours"] >= 5e6)
    (tokenize,) = [r for r in summary["rows"] if r["name"].startswith("tokenize pipeline images/s")]
    assert tokenize["reference_name"] == "bare encode" and tokenize["met"] == (tokenize["ratio"] >= 0.9)
    check_figures(summary["rows"])


def test_rows_compute_ratio_and_aims():
    fast = row(common.figure("a", "tokens/s", 120.0, 100.0, "ref", aim_ratio=1.0))
    slow = row(common.figure("b", "tokens/s", 80.0, 100.0, "ref", aim_ratio=1.0))
    absolute = row(common.figure("c", "tokens/s", 4e6, aim_min=5e6))
    missing = row(common.figure("d", "images/s", None, 3.0, "ref", aim_ratio=1.0))
    plain = row({"name": "e", "unit": "images/s", "ours": 7.0})
    assert fast["ratio"] == pytest.approx(1.2) and fast["met"] is True
    assert slow["ratio"] == pytest.approx(0.8) and slow["met"] is False
    assert absolute["ratio"] is None and absolute["met"] is False
    assert missing["ratio"] is None and missing["met"] is None  # not measured is not a miss
    assert plain["met"] is None
    text = table([fast, slow, absolute, missing, plain])
    lines = text.splitlines()
    assert len(lines) == 7 and len({len(line) for line in lines}) == 1  # header, rule, five aligned rows
    assert "1.20x" in lines[2] and "yes" in lines[2] and "NO" in lines[3] and ">= 5.00M tokens/s" in lines[4]


def test_bad_names_are_user_errors():
    with pytest.raises(UserError, match="nope"):
        parse_flags(["nope=--x 1"], discover())
    assert parse_flags(["lvm_train=--contexts 512 --repeats 2"], discover()) == {
        "bench_lvm_train": ["--contexts", "512", "--repeats", "2"]
    }
    with pytest.raises(SystemExit) as exit_info:
        main(["--only", "nope"])
    assert exit_info.value.code == 2


def test_alternate_rotates_the_order():
    calls: list[str] = []
    times = common.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, repeats=3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert [len(t) for t in times.values()] == [3, 3]
    matmul, flops = common.gemm("cpu", torch.float32, 64)
    assert matmul().shape == (64, 64) and flops == 2 * 64**3


def test_train_flops_formula_matches_the_counter_and_twins_agree():
    from bench.bench_lvm_train import flops_per_step, formula_flops_per_token, hf_twin
    from lvm_pl.lvm.config import LVMConfig
    from lvm_pl.lvm.model import LLaMA

    config = LVMConfig(vocab_size=8292, block_size=64, n_embd=32, n_layer=2, n_head=4, n_query_groups=2)
    assert flops_per_step(config, 2, 48) == pytest.approx(formula_flops_per_token(config, 48) * 2 * 48, rel=1e-9)
    torch.manual_seed(0)
    ours = LLaMA(config).eval()
    idx = torch.randint(0, 8292, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf_twin(ours).eval()(input_ids=idx).logits, atol=1e-5, rtol=1e-5)


def test_vqgan_reference_holds_our_weights_and_does_the_whole_job(repo_root):
    from bench.bench_vqgan import models, reference_decode, reference_encode

    ours, vq = models(repo_root / "configs/vqgan/recipe.yaml", "cpu")  # the released architecture
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        ids = reference_encode(vq, images)
        latents = vq.encode(images).latents.permute(0, 2, 3, 1)  # [B, h, w, C]
        nearest = torch.cdist(latents.flatten(0, 2), vq.quantize.embedding.weight).argmin(-1)
        decoded = reference_decode(vq, ids)
        assert torch.equal(ids, ours.encode(images))
        torch.testing.assert_close(decoded.clamp(-1, 1), ours.decode(ids), atol=1e-4, rtol=0)
    assert ids.shape == (2, 2, 2)
    torch.testing.assert_close(ids.flatten(), nearest)  # ids are the nearest codes: encode did the whole job
    assert decoded.shape == (2, 3, 32, 32)
