import numpy as np
import pytest
import torch

from lvm_pl.console import UserError
from lvm_pl.tokens import TokenLayout


def test_paper_layout_matches_released_checkpoint():
    layout = TokenLayout.for_images(codebook_size=8192, image_size=256, downsample=16)
    assert layout.tokens_per_image == 256
    assert layout.vocab_size == 8292
    assert (layout.bos_id, layout.eos_id) == (8192, 8193)
    assert layout.storage_dtype == np.uint16
    assert layout.sentence_length(16) == 16 * 256 + 2


def test_sentence_roundtrip_and_specials():
    layout = TokenLayout(codebook_size=16, tokens_per_image=4)
    imgs = torch.arange(12).reshape(3, 2, 2) % 16
    seq = layout.sentence(imgs)
    assert seq.tolist() == [16, *range(12), 17]
    assert torch.equal(layout.images(seq), imgs.reshape(3, 4))
    assert layout.is_codebook(seq).tolist() == [False] + [True] * 12 + [False]


def test_switches_drop_bos_eos():
    layout = TokenLayout(codebook_size=16, tokens_per_image=4, add_bos=False, add_eos=False)
    assert layout.sentence(torch.zeros(2, 4, dtype=torch.long)).numel() == 8
    assert layout.image_start(1) == 4


def test_bad_values_are_user_errors():
    with pytest.raises(UserError, match="image_size=100"):
        TokenLayout.for_images(codebook_size=8192, image_size=100, downsample=16)
    with pytest.raises(UserError, match="vocabulary 8292"):
        TokenLayout(codebook_size=8192, tokens_per_image=256).check_compatible(8000, "model")


def test_dict_roundtrip():
    layout = TokenLayout(codebook_size=1024, tokens_per_image=64, num_special=8)
    assert TokenLayout.from_dict(layout.to_dict()) == layout


@pytest.mark.parametrize("add_bos", [True, False])
def test_frames_that_fit_the_released_context(add_bos):
    """4096 positions of 256-token frames: 16 frames (15 prompt + the generated one, its last token never fed);
    BOS + 15 * 256 + 255 = 4096. With EOS to predict, a training sentence holds one frame fewer."""
    layout = TokenLayout(codebook_size=8192, tokens_per_image=256, add_bos=add_bos, add_eos=add_bos)
    assert layout.frames_that_fit(4096) == 16
    assert layout.frames_that_fit(4096, with_eos=True) == (15 if add_bos else 16)
    assert layout.frames_that_fit(4095) == (15 if add_bos else 16)


def test_frames_that_fit_the_demo_context():
    layout = TokenLayout(codebook_size=512, tokens_per_image=64)  # configs/demo: 8x8 tokens, block_size 576
    assert layout.frames_that_fit(576) == 9  # BOS + 8 prompt frames + 63 fed tokens = 576
    assert layout.frames_that_fit(576, with_eos=True) == 8  # BOS + 9 * 64 + EOS - 1 = 577 would not fit


def test_bos_free_layout_pads_with_the_first_special():
    released = TokenLayout(codebook_size=8192, tokens_per_image=256, add_bos=False, add_eos=False)
    assert released.pad_id == 8192 and released.vocab_size == 8292 and released.sentence_length(2) == 512
    assert TokenLayout(codebook_size=8192, tokens_per_image=256).pad_id == 8193
