"""The autoencoder against diffusers' VQModel: same keys (but the codebook), same outputs, same parameter count."""

import pytest
import torch
from diffusers import VQModel
from helpers import compose, config_files, usage

from lvm_pl.vqgan.autoencoder import Autoencoder
from lvm_pl.vqgan.quantizers import VectorQuantizer


def _pair(channels, layers, latent, codes, groups, mid_attention, attention_levels=()):
    levels = len(channels)
    down = ["AttnDownEncoderBlock2D" if i in attention_levels else "DownEncoderBlock2D" for i in range(levels)]
    up = ["AttnUpDecoderBlock2D" if levels - 1 - i in attention_levels else "UpDecoderBlock2D" for i in range(levels)]
    ref = VQModel(
        block_out_channels=channels,
        down_block_types=down,
        up_block_types=up,
        layers_per_block=layers,
        latent_channels=latent,
        num_vq_embeddings=codes,
        norm_num_groups=groups,
        mid_block_add_attention=mid_attention,
    )
    ours = Autoencoder(channels, layers, latent, None, groups, list(attention_levels), mid_attention)
    return ref, ours, VectorQuantizer(codes, latent)


def _load_from_diffusers(ref, ours, quantizer):
    state = ref.state_dict()
    quantizer.embedding.weight.data.copy_(state.pop("quantize.embedding.weight"))
    ours.load_state_dict(state)  # strict: every other key has the same name and shape


@pytest.mark.parametrize("mid_attention,attention_levels", [(False, ()), (True, (2,))])
def test_matches_diffusers_vqmodel(mid_attention, attention_levels):
    torch.manual_seed(0)
    ref, ours, quantizer = _pair([16, 32, 32], 1, 8, 64, 8, mid_attention, attention_levels)
    _load_from_diffusers(ref, ours, quantizer)
    ref.eval(), ours.eval(), quantizer.eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z_ref = ref.encode(x).latents
        z = ours.encode(x)
        assert z.shape == (2, 8, 8, 8) and ours.downsample_factor == 4
        torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-5)
        _, _, (_, _, ref_idx) = ref.quantize(z_ref)
        out = quantizer(z)
        assert torch.equal(out.indices.flatten(), ref_idx.flatten())
        img_ref = ref.decode(z_ref).sample
        torch.testing.assert_close(ours.decode(out.quantized), img_ref, atol=1e-4, rtol=1e-4)


def test_muse_config_parameter_count():
    cfg = compose(config_files(usage("configs/vqgan/muse_f16_8192.yaml")))["model"]["init_args"]
    ae, q = cfg["autoencoder"]["init_args"], cfg["quantizer"]["init_args"]
    ref = VQModel(
        block_out_channels=ae["block_out_channels"],
        down_block_types=["DownEncoderBlock2D"] * 5,
        up_block_types=["UpDecoderBlock2D"] * 5,
        layers_per_block=ae["layers_per_block"],
        latent_channels=ae["latent_channels"],
        num_vq_embeddings=q["codebook_size"],
        norm_num_groups=ae["norm_num_groups"],
        mid_block_add_attention=ae["mid_attention"],
    )
    with torch.device("meta"):
        ours = Autoencoder(**ae)
        quantizer = VectorQuantizer(**q)
    count = sum(p.numel() for p in ours.parameters()) + quantizer.embedding.weight.numel()
    assert sum(p.numel() for p in ref.parameters()) == 146_244_675
    assert count == 146_244_675
    assert ours.downsample_factor == 16


def _latents_changed(encoder_norm: str) -> tuple[bool, bool]:
    """Change one corner pixel of a 64 px image: does the latent next to it change, and the one at the far corner?"""
    torch.manual_seed(0)
    ae = Autoencoder([8, 16, 16], 1, 4, None, 4, [], False, encoder_norm=encoder_norm).eval()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    y = x.clone()
    y[:, :, 0, 0] = -x[:, :, 0, 0]
    with torch.no_grad():
        a, b = ae.encode(x), ae.encode(y)
    diff = (a - b).abs().amax(1)[0]  # [16, 16]
    return bool(diff[0, 0] > 0), bool(diff[-1, -1] > 0)


def test_position_norm_keeps_latents_local_and_group_norm_does_not():
    # GroupNorm statistics span the image, so one pixel moves every latent; PositionNorm's span the channels at a
    # position, so latents outside the pixel's receptive field stay exactly equal (stable tokens for video)
    assert _latents_changed("group") == (True, True)
    assert _latents_changed("position") == (True, False)


def test_position_norm_has_group_norm_parameter_names():
    group = Autoencoder([8, 16], 1, 4, None, 4, [], False)
    position = Autoencoder([8, 16], 1, 4, None, 4, [], False, encoder_norm="position")
    assert group.state_dict().keys() == position.state_dict().keys()
    with pytest.raises(ValueError, match="encoder_norm"):
        Autoencoder([8, 16], 1, 4, None, 4, [], False, encoder_norm="batch")


def _token_window_edit(encoder_receptive: str) -> tuple[bool, bool]:
    """Token (3, 3) of a 32 px image at f = 4 sees pixels 11..16 in a local encoder (its patch 12..15 plus a rim):
    rewrite every pixel outside that window, then one pixel inside its patch; does the token's latent change?"""
    torch.manual_seed(0)
    ae = Autoencoder(
        [8, 16, 16], 1, 4, None, 4, [], False, encoder_norm="position", encoder_receptive=encoder_receptive
    ).eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    outside = torch.rand_like(x) * 2 - 1
    outside[:, :, 11:17, 11:17] = x[:, :, 11:17, 11:17]
    inside = x.clone()
    inside[:, :, 13, 14] = -x[:, :, 13, 14]
    with torch.no_grad():
        base, far, near = (ae.encode(image)[0, :, 3, 3] for image in (x, outside, inside))
    assert ae.encode(x).shape == (1, 4, 8, 8)
    return not torch.equal(base, far), not torch.equal(base, near)


def test_local_encoder_token_sees_only_its_patch_and_rim():
    assert _token_window_edit("local") == (False, True)
    assert _token_window_edit("wide") == (True, True)  # 3x3 resnets, downsamples and mid block reach much farther


def test_local_encoder_keys_and_shapes():
    wide = Autoencoder([8, 16, 16], 1, 4, None, 4, [], False)
    local = Autoencoder([8, 16, 16], 1, 4, None, 4, [], False, encoder_receptive="local")
    wide_keys = [k for k in wide.state_dict() if not k.startswith("encoder.mid_block.")]
    assert list(local.state_dict()) == wide_keys  # the same names; only the mid block is gone
    assert local.encoder.down_blocks[0].resnets[0].conv1.kernel_size == (1, 1)
    assert local.encoder.down_blocks[0].downsamplers[0].conv.kernel_size == (2, 2)
    assert local.encoder.conv_out.kernel_size == (1, 1) and local.encoder.conv_in.kernel_size == (3, 3)
    assert local.decoder.state_dict().keys() == wide.decoder.state_dict().keys()
    assert local.decode(local.encode(torch.zeros(1, 3, 32, 32))).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="encoder_receptive"):
        Autoencoder([8, 16], 1, 4, None, 4, [], False, encoder_receptive="narrow")
    with pytest.raises(ValueError, match="attention"):
        Autoencoder([8, 16], 1, 4, None, 4, [], True, encoder_receptive="local")
