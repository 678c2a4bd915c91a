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
