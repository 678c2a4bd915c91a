"""`demo --scaling true`: validation curves read back from the runs' TensorBoard events (resumed runs included),
tokens seen from the study's configs, parameter counts from the runs' checkpoints, the CSV/PNG (labelled axes, one
labelled line per size) and the verdict on whether larger models reach lower loss."""

from __future__ import annotations

import csv

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from lvm_pl import scaling
from lvm_pl.lvm.config import LVMConfig
from lvm_pl.lvm.model import LLaMA


def log_run(root, size: str, version: int, points: dict[int, float]) -> None:
    """val/loss at these logged steps, written the way Lightning's TensorBoardLogger writes them (the validation
    after 100 training steps is logged at step 99)."""
    writer = SummaryWriter(str(root / f"scaling_{size}" / f"version_{version}"))
    for step, loss in points.items():
        writer.add_scalar("val/loss", loss, step)
    writer.close()


def save_checkpoint(root, size: str, n_embd: int) -> int:
    """A last.ckpt as Lightning saves an LVM's (its decoder's weights under `model.`); returns the decoder's size."""
    decoder = LLaMA(LVMConfig(vocab_size=300, block_size=64, n_embd=n_embd, n_layer=1, n_head=2, intermediate_size=64))
    path = root / f"scaling_{size}" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    state = {f"model.{name}": t for name, t in decoder.state_dict().items()}
    torch.save({"global_step": 300, "state_dict": state, "hyper_parameters": {"preset": "tiny"}}, path)
    return sum(p.numel() for p in decoder.parameters())


@pytest.fixture
def in_repo(repo_root, tmp_path, monkeypatch):
    monkeypatch.chdir(repo_root)  # the study reads its configs from configs/demo/
    return tmp_path


def test_curves_from_resumed_runs_in_tokens_and_the_verdict(in_repo):
    runs = in_repo / "runs"
    losses = {"small": 3.0, "medium": 2.5, "large": 2.0}
    for size, loss in losses.items():
        log_run(runs, size, 0, {99: loss + 1, 199: loss + 0.5})
        log_run(runs, size, 1, {299: loss})  # resumed after a kill: a second logger version
    params = {size: save_checkpoint(runs, size, n_embd) for size, n_embd in zip(losses, (16, 32, 64), strict=True)}
    curves = scaling.collect(runs)
    assert scaling.parameters(runs) == params
    per_step = 8 * 576  # configs/demo/scaling.yaml: batch_size x seq_len
    assert [t for t, _ in curves["small"]] == [100 * per_step, 200 * per_step, 300 * per_step]
    assert curves["large"][-1][1] == pytest.approx(2.0)
    paths = scaling.write(curves, params, in_repo / "out")
    rows = list(csv.DictReader(paths[0].open()))
    first = {"size": "small", "params": str(params["small"]), "tokens": str(100 * per_step), "val_loss": "4.00000"}
    assert len(rows) == 9 and rows[0] == first
    assert paths[1].read_bytes()[:4] == b"\x89PNG"
    ax = scaling.figure(curves, params).axes[0]
    assert ax.get_xlabel().startswith("tokens seen") and ax.get_ylabel().startswith("validation loss")
    assert ax.get_title()
    shown = [text.get_text() for text in ax.get_legend().get_texts()]
    assert shown == [f"{size} ({params[size] / 1e6:.2f}M params)" for size in losses]
    assert scaling.verdict(curves)[1].startswith("scaling bar : larger models reach lower loss at equal tokens: yes")
    curves["large"][-1] = (curves["large"][-1][0], 2.6)
    assert ": NO" in scaling.verdict(curves)[1]


def test_a_size_without_validation_is_named(in_repo):
    log_run(in_repo / "runs", "small", 0, {99: 3.0})
    with pytest.raises(Exception, match="no val/loss logged under .*scaling_medium"):
        scaling.collect(in_repo / "runs")
