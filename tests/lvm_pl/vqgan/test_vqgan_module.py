"""The VQGAN module end to end through main.py's CLI: fit, checkpoint, load_tokenizer, predict_step, test JSON."""

import json
from pathlib import Path

import pytest
import torch

from lvm_pl.batches import ImageBatch, SentenceBatch, TokenizedSentences
from lvm_pl.console import UserError
from lvm_pl.vqgan import load_tokenizer
from lvm_pl.vqgan.module import VQGAN
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


def test_input_range_is_applied_inside_encode_and_decode(fitted):
    """A [0, 1] tokenizer (the released one's range) sees (x + 1) / 2 and its decodes, clamped to [0, 1], come back
    in [-1, 1]; callers never know."""
    _, ckpt = fitted
    tok = load_tokenizer(ckpt)
    tok.input_range = (0.0, 1.0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    ae = tok._eval_autoencoder()
    idx = tok.encode(x)
    assert torch.equal(idx, tok.quantizer(ae.encode((x + 1) / 2)).indices)
    raw = ae.decode(tok.quantizer.embed(idx))
    torch.testing.assert_close(tok.decode(idx), raw.clamp(0, 1) * 2 - 1)
    assert not torch.equal(idx, load_tokenizer(ckpt).encode(x))  # the range changes what the encoder sees
    with pytest.raises(UserError, match=r"model.input_range=\[1.0, 0.0\]"):
        VQGAN(tok.autoencoder, tok.quantizer, tok.loss, input_range=(1.0, 0.0))


def test_predict_step_encodes_real_images_only(fitted):
    _, ckpt = fitted
    tok = load_tokenizer(ckpt)
    images = torch.rand(2, 3, 3, 16, 16) * 2 - 1
    batch = SentenceBatch(images, torch.tensor([3, 1]), torch.tensor([5, 9]), ["a", "b"])
    out = tok.predict_step(batch, 0)
    assert isinstance(out, TokenizedSentences)
    assert out.tokens.shape == (2, 3, 4, 4)
    assert torch.equal(out.tokens[0], tok.encode(images[0]))
    assert torch.equal(out.tokens[1, :1], tok.encode(images[1, :1]))
    assert (out.tokens[1, 1:] == 0).all()
    assert out.kinds == ["a", "b"] and out.index.tolist() == [5, 9] and out.num_images.tolist() == [3, 1]
    with pytest.raises(UserError, match="data.unit: tokenizing .* needs whole sentences"):
        tok.predict_step(ImageBatch(images[:, 0], ["a", "b"]), 0)


def test_test_stage_writes_json(fitted, repo_root):
    _, ckpt = fitted
    run = cli(["test", *_args(repo_root), f"--ckpt_path={ckpt}", "--trainer.limit_test_batches=2"])
    results = json.loads(Path(run.trainer.log_dir, "test_results.json").read_text())
    assert results["images"] == 8
    assert 0 < results["psnr"] < 100 and -1 <= results["ssim"] <= 1
    assert 0 < results["usage"] <= 1 and results["perplexity"] >= 1
    assert "lpips" not in results and any("lpips" in n for n in results["notes"])
    assert any("rfid" in n for n in results["notes"])


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """torch-fidelity's Inception with random weights, saved under the name of the real weights file."""
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as fe

    from lvm_pl.metrics import INCEPTION_FILE

    with (
        mock.patch.object(fe, "load_state_dict_from_url", return_value={}),
        mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict"),
    ):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.manual_seed(0)
    for m in net.modules():  # variance-keeping init, so the random features are not all ~0
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("hub") / INCEPTION_FILE
    torch.save(net.state_dict(), path)
    return path


@pytest.mark.slow
def test_test_stage_computes_rfid_with_local_inception_weights(fitted, repo_root, inception_file):
    _, ckpt = fitted
    run = cli(
        ["test", *_args(repo_root), f"--ckpt_path={ckpt}", "--trainer.limit_test_batches=2"]
        + [f"--model.init_args.fid_weights={inception_file}"]
    )
    results = json.loads(Path(run.trainer.log_dir, "test_results.json").read_text())
    assert results["rfid"] >= 0 and not any("rfid" in n for n in results["notes"])


@pytest.mark.slow
def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift(inception_file):
    from lvm_pl.metrics import frechet_inception_distance

    torch.manual_seed(0)
    images = torch.rand(16, 3, 32, 32)
    scores = []
    for other in (images, (images * 0.5 + 0.5)):
        fid = frechet_inception_distance(inception_file)
        fid.update(images, real=True)
        fid.update(other, real=False)
        scores.append(float(fid.compute()))
    assert abs(scores[0]) < 1e-2 and scores[1] > scores[0] + 1e-3


def test_missing_fid_weights_file_is_named(tmp_path, monkeypatch):
    from lvm_pl.metrics import inception_weights

    with pytest.raises(UserError, match="fid_weights=.*nope.pth: no such file"):
        inception_weights(str(tmp_path / "nope.pth"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights, note = inception_weights(None)
    assert weights is None and str(tmp_path) in note and "fid_weights" in note


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
