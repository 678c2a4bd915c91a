"""diffusers VQModel <-> lvm-pl VQGAN: both directions reproduce encode indices and decoded images; unsupported
options are refused by name; outputs appear whole or not at all."""

from __future__ import annotations

import json

import lightning
import pytest
import torch
from diffusers import VQModel
from lightning.pytorch.cli import instantiate_module

from lvm_pl.console import UserError
from lvm_pl.interop.diffusers_vq import export_diffusers
from lvm_pl.interop.vqgan_import import import_vqgan
from lvm_pl.vqgan import load_tokenizer
from lvm_pl.vqgan.module import VQGAN

# instantiate_module outside LightningCLI: save_hyperparameters sees the built parts (we write hparams ourselves)
pytestmark = pytest.mark.filterwarnings("ignore:Attribute '.*' is an instance of `nn.Module`")

CHANNELS, GROUPS, CODES, LATENT = [32, 64], 8, 64, 8


def _spread_codebook(weight: torch.Tensor, latents: torch.Tensor) -> None:
    """Codes := encoder outputs + noise, so random-weight images map to many codes (not one)."""
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    picks = torch.randint(0, flat.shape[0], (weight.shape[0],))
    weight.data.copy_(flat[picks] + 0.1 * flat.std() * torch.randn_like(flat[picks]))


def _images(n: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _reference(ref: VQModel, x: torch.Tensor, unit: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' indices [B, h, w] and decoded images of [-1, 1] images `x`, fed in [0, 1] when `unit` (amused's
    convention: decodes clamped to [0, 1]) and mapped back to [-1, 1]."""
    with torch.no_grad():
        z = ref.encode((x + 1) / 2 if unit else x).latents
        _, _, (_, _, idx) = ref.quantize(z)
        decoded = ref.decode(z).sample
        decoded = decoded.clamp(0, 1) * 2 - 1 if unit else decoded.clamp(-1, 1)
        return idx.reshape(z.shape[0], *z.shape[2:]), decoded


def _check_same(ours: VQGAN, ref: VQModel, unit: bool = False) -> None:
    x = _images()
    ref_idx, ref_img = _reference(ref.eval(), x, unit)
    idx = ours.encode(x)
    assert idx.unique().numel() > 4  # a test where every position takes one code could not see a mix-up
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(ours.decode(idx), ref_img, atol=1e-4, rtol=0)


def _vqmodel(**overrides) -> VQModel:
    torch.manual_seed(0)
    cfg = dict(
        block_out_channels=CHANNELS,
        down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
        layers_per_block=1,
        latent_channels=LATENT,
        num_vq_embeddings=CODES,
        norm_num_groups=GROUPS,
        mid_block_add_attention=True,
    )
    ref = VQModel(**(cfg | overrides)).eval()
    with torch.no_grad():
        _spread_codebook(ref.quantize.embedding.weight, ref.encode(_images()).latents)
    return ref


def test_import_matches_diffusers(tmp_path):
    ref = _vqmodel()
    ref.save_pretrained(tmp_path / "vq")
    import_vqgan(str(tmp_path / "vq"), str(tmp_path / "vq.ckpt"))
    ours = load_tokenizer(tmp_path / "vq.ckpt")
    assert ours.codebook_size == CODES and ours.downsample_factor == 2
    assert ours.input_range == (0.0, 1.0)  # a released (amused) VQModel works on [0, 1] pixels
    hp = torch.load(tmp_path / "vq.ckpt", weights_only=True)["hyper_parameters"]  # LightningCLI reads it this way
    assert hp["_class_path"] == "lvm_pl.vqgan.module.VQGAN"
    assert hp["autoencoder"]["init_args"]["attention_levels"] == [1]
    assert hp["loss"]["init_args"]["discriminator"]["class_path"] == "lvm_pl.vqgan.discriminators.PatchGAN"
    _check_same(ours, ref, unit=True)


def _our_checkpoint(path, quantizer: dict | None = None, ema_decay: float | None = None) -> VQGAN:
    """A small VQGAN saved as a Lightning checkpoint with LightningCLI-style hyper-parameters."""
    hparams = {
        "_class_path": "lvm_pl.vqgan.module.VQGAN",
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
        "autoencoder": {
            "class_path": "lvm_pl.vqgan.autoencoder.Autoencoder",
            "init_args": {
                "block_out_channels": CHANNELS,
                "layers_per_block": 1,
                "latent_channels": LATENT,
                "norm_num_groups": GROUPS,
                "attention_levels": [0],
                "mid_attention": False,
            },
        },
        "quantizer": quantizer
        or {
            "class_path": "lvm_pl.vqgan.quantizers.VectorQuantizer",
            "init_args": {"codebook_size": CODES, "embed_dim": LATENT},
        },
        "loss": {
            "class_path": "lvm_pl.vqgan.losses.VQGANLoss",
            "init_args": {"discriminator": {"class_path": "lvm_pl.vqgan.discriminators.PatchGAN"}, "perceptual": None},
        },
        "ema_decay": ema_decay,
    }
    torch.manual_seed(0)
    model = instantiate_module(VQGAN, {k: v for k, v in hparams.items() if k != "_instantiator"}).eval()
    if ema_decay:  # make the EMA copy differ from the live weights: export must take the EMA (what decode uses)
        with torch.no_grad():
            for p in model.autoencoder.parameters():
                p.add_(torch.randn_like(p))
    if getattr(model.quantizer, "code_dim", None) == LATENT:
        with torch.no_grad():
            _spread_codebook(model.quantizer.embedding.weight, model._eval_autoencoder().encode(_images()))
    ckpt = {
        "state_dict": model.state_dict(),
        "hyper_parameters": hparams,
        "pytorch-lightning_version": lightning.__version__,
    }
    torch.save(ckpt, path)
    return model


@pytest.mark.parametrize("ema_decay", [None, 0.999])
def test_export_matches_ours(tmp_path, ema_decay):
    _our_checkpoint(tmp_path / "ours.ckpt", ema_decay=ema_decay)
    export_diffusers(str(tmp_path / "ours.ckpt"), str(tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left
    ref = VQModel.from_pretrained(tmp_path / "out")
    assert list(ref.config.down_block_types) == ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]
    assert list(ref.config.up_block_types) == ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]
    _check_same(load_tokenizer(tmp_path / "ours.ckpt"), ref)
    import_vqgan(str(tmp_path / "out"), str(tmp_path / "back.ckpt"))  # our [-1, 1] range travels in config.json
    back = load_tokenizer(tmp_path / "back.ckpt")
    assert back.input_range == (-1.0, 1.0)
    _check_same(back, ref)


@pytest.mark.parametrize(
    "init_args,named",
    [
        ({"code_dim": 4}, "model.quantizer.code_dim=4"),
        ({"normalize": True}, "model.quantizer.normalize=true"),
        ({"code_dim": 4, "normalize": True}, "model.quantizer.code_dim=4"),  # the first one is named
    ],
)
def test_export_refuses_what_diffusers_cannot_express(tmp_path, init_args, named):
    q = {
        "class_path": "lvm_pl.vqgan.quantizers.VectorQuantizer",
        "init_args": {"codebook_size": CODES, "embed_dim": LATENT} | init_args,
    }
    _our_checkpoint(tmp_path / "ours.ckpt", quantizer=q)
    with pytest.raises(UserError, match=named):
        export_diffusers(str(tmp_path / "ours.ckpt"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_export_refuses_fsq(tmp_path):
    q = {"class_path": "lvm_pl.vqgan.quantizers.FSQ", "init_args": {"levels": [4, 4, 4], "embed_dim": LATENT}}
    _our_checkpoint(tmp_path / "ours.ckpt", quantizer=q)
    with pytest.raises(UserError, match=r"model\.quantizer\.class_path=lvm_pl\.vqgan\.quantizers\.FSQ"):
        export_diffusers(str(tmp_path / "ours.ckpt"), str(tmp_path / "out"))


def test_export_never_leaves_a_half_written_dir(tmp_path, monkeypatch):
    _our_checkpoint(tmp_path / "ours.ckpt")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="out_dir=.*busy.*not empty"):
        export_diffusers(str(tmp_path / "ours.ckpt"), str(tmp_path / "busy"))
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]

    def fail_midway(self, save_directory, **kwargs):
        (save_directory / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(VQModel, "save_pretrained", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        export_diffusers(str(tmp_path / "ours.ckpt"), str(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "ours.ckpt"]  # no out dir, no temp dir


@pytest.mark.parametrize(
    "change,named",
    [
        ({"norm_type": "spatial"}, "norm_type='spatial'"),
        ({"down_block_types": ["DownEncoderBlock2D", "DownBlock2D"]}, r"down_block_types\[1\]='DownBlock2D'"),
        ({"up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"]}, r"up_block_types\[0\]='UpDecoderBlock2D'"),
        ({"act_fn": "gelu"}, "act_fn='gelu'"),
        ({"in_channels": 4}, "in_channels=4"),
        ({"norm_type": "spatial", "act_fn": "gelu"}, "act_fn='gelu'"),  # the first one checked is named
        ({"_class_name": "AutoencoderKL"}, "_class_name='AutoencoderKL'"),
    ],
)
def test_import_refuses_unsupported_options(tmp_path, change, named):
    ref = _vqmodel()
    ref.save_pretrained(tmp_path / "vq")
    cfg_file = tmp_path / "vq" / "config.json"
    cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text()) | change))
    with pytest.raises(UserError, match=named):
        import_vqgan(str(tmp_path / "vq"), str(tmp_path / "vq.ckpt"))
    assert not (tmp_path / "vq.ckpt").exists()


def test_import_names_weights_that_do_not_fit(tmp_path):
    _vqmodel().save_pretrained(tmp_path / "vq")
    (tmp_path / "vq" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match="source_dir=.*cannot load"):
        import_vqgan(str(tmp_path / "vq"), str(tmp_path / "vq.ckpt"))
    assert not (tmp_path / "vq.ckpt").exists()
