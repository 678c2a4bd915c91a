"""`demo --scaling true`: validation curves read back from the runs' TensorBoard events (resumed runs included),
tokens seen from the study's configs, the CSV/PNG, and the verdict on whether larger models reach lower loss."""

from __future__ import annotations

import csv

import pytest
from torch.utils.tensorboard import SummaryWriter

from lvm_pl import scaling


def log_run(root, size: str, version: int, points: dict[int, float]) -> None:
    """val/loss at these steps, written the way Lightning's TensorBoardLogger writes them."""
    writer = SummaryWriter(str(root / f"scaling_{size}" / f"version_{version}"))
    for step, loss in points.items():
        writer.add_scalar("val/loss", loss, step)
    writer.close()


@pytest.fixture
def in_repo(repo_root, tmp_path, monkeypatch):
    monkeypatch.chdir(repo_root)  # the study reads its configs from configs/demo/
    return tmp_path


def test_curves_from_resumed_runs_in_tokens_and_the_verdict(in_repo):
    runs = in_repo / "runs"
    losses = {"small": 3.0, "medium": 2.5, "large": 2.0}
    for size, loss in losses.items():
        log_run(runs, size, 0, {100: loss + 1, 200: loss + 0.5})
        log_run(runs, size, 1, {300: loss})  # resumed after a kill: a second logger version
    curves = scaling.collect(runs)
    per_step = 8 * 576  # configs/demo/scaling.yaml: batch_size x seq_len
    assert [t for t, _ in curves["small"]] == [100 * per_step, 200 * per_step, 300 * per_step]
    assert curves["large"][-1][1] == pytest.approx(2.0)
    paths = scaling.write(curves, in_repo / "out")
    rows = list(csv.DictReader(paths[0].open()))
    assert len(rows) == 9 and rows[0] == {"size": "small", "tokens": str(100 * per_step), "val_loss": "4.00000"}
    assert paths[1].read_bytes()[:4] == b"\x89PNG"
    assert scaling.verdict(curves)[1].startswith("scaling bar : larger models reach lower loss at equal tokens: yes")
    curves["large"][-1] = (curves["large"][-1][0], 2.6)
    assert ": NO" in scaling.verdict(curves)[1]


def test_a_size_without_validation_is_named(in_repo):
    log_run(in_repo / "runs", "small", 0, {100: 3.0})
    with pytest.raises(Exception, match="no val/loss logged under .*scaling_medium"):
        scaling.collect(in_repo / "runs")
