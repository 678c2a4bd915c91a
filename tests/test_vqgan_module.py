"""The VQGAN module end to end through main.py's CLI: fit, checkpoint, load_tokenizer, predict_step, test JSON."""

import json
from pathlib import Path

import pytest
import torch

from lvm_pl.console import UserError
from lvm_pl.vqgan import load_tokenizer
from main import cli


def _args(repo_root: Path, *extra: str) -> list[str]:
    return [
        "-c",
        str(repo_root / "configs/vqgan/tiny.yaml"),
        "-c",
        str(repo_root / "configs/data/builtin.yaml"),
        "--data.init_args.image_size=16",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
        "--data.init_args.source.init_args.splits={train: 16, val: 8, test: 8}",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def fitted(repo_root, tmp_path_factory):
    """A 3-step fit with the GAN on from step 0 and an EMA autoencoder; returns (cli, checkpoint path)."""
    import os

    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("fit"))
    try:
        run = cli(
            [
                "fit",
                *_args(repo_root),
                "--model.init_args.loss.init_args.disc_start=0",
                "--model.init_args.loss.init_args.disc_weight=0.1",  # the tiny config has the GAN off
                "--model.init_args.loss.init_args.lecam_weight=0.1",
                "--model.init_args.ema_decay=0.9",
                "--trainer.max_steps=3",
                "--trainer.val_check_interval=3",
            ]
        )
        ckpt = Path("vqgan.ckpt").resolve()
        run.trainer.save_checkpoint(ckpt)
        yield run, ckpt
    finally:
        os.chdir(old)


def test_fit_logs_and_checkpoint(fitted):
    run, ckpt = fitted
    metrics = run.trainer.callback_metrics
    for key in ("train/g", "train/d", "train/adaptive_weight", "train/lecam", "val/psnr", "val/ssim", "val/usage"):
        assert torch.isfinite(metrics[key]), key
    assert ckpt.is_file()


def test_load_tokenizer_round_trip(fitted):
    run, ckpt = fitted
    tok = load_tokenizer(ckpt)
    assert not tok.training and not any(p.requires_grad for p in tok.parameters())
    assert tok.codebook_size == 256 and tok.downsample_factor == 4
    assert tok.ema is not None  # the class_path-injected parts and the EMA copy were rebuilt from the checkpoint
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    idx = tok.encode(x)
    assert idx.shape == (2, 4, 4) and idx.dtype == torch.long
    assert idx.min() >= 0 and idx.max() < tok.codebook_size
    out = tok.decode(idx)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    torch.testing.assert_close(tok.reconstruct(x), out)
    trained = run.model.eval()
    assert torch.equal(trained.encode(x), idx)


def test_predict_step_encodes_real_images_only(fitted):
    _, ckpt = fitted
    tok = load_tokenizer(ckpt)
    images = torch.rand(2, 3, 3, 16, 16) * 2 - 1
    batch = {"images": images, "num_images": torch.tensor([3, 1]), "kind": ["a", "b"], "index": torch.tensor([5, 9])}
    out = tok.predict_step(batch, 0)
    assert out["tokens"].shape == (2, 3, 4, 4)
    assert torch.equal(out["tokens"][0], tok.encode(images[0]))
    assert torch.equal(out["tokens"][1, :1], tok.encode(images[1, :1]))
    assert (out["tokens"][1, 1:] == 0).all()
    assert out["kind"] == ["a", "b"] and out["index"].tolist() == [5, 9]


def test_test_stage_writes_json(fitted, repo_root):
    _, ckpt = fitted
    run = cli(["test", *_args(repo_root), f"--ckpt_path={ckpt}", "--trainer.limit_test_batches=2"])
    results = json.loads(Path(run.trainer.log_dir, "test_results.json").read_text())
    assert results["images"] == 8
    assert 0 < results["psnr"] < 100 and -1 <= results["ssim"] <= 1
    assert 0 < results["usage"] <= 1 and results["perplexity"] >= 1
    assert "lpips" not in results and any("lpips" in n for n in results["notes"])
    assert any("rfid" in n for n in results["notes"])


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="missing.ckpt"):
        load_tokenizer(tmp_path / "missing.ckpt")
    lvm = tmp_path / "lvm.ckpt"
    torch.save({"hyper_parameters": {"model": "tiny", "lr": 1e-3}, "state_dict": {}}, lvm)
    with pytest.raises(UserError, match="lvm.ckpt.*not a VQGAN"):
        load_tokenizer(lvm)


def test_bf16_autocast_step_on_cpu(fitted):
    run, _ = fitted
    model = run.model.train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon, q = model._forward(x, model.autoencoder)
        total, _ = model.loss(x, recon, q.loss, model.autoencoder.last_layer, step=10)
    total.backward()
    assert torch.isfinite(total) and q.indices.dtype == torch.long
    assert model.autoencoder.encoder.conv_in.weight.grad.isfinite().all()
