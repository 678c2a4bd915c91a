"""Sampling: special ids never drawn, top-k/top-p keep exactly the expected ids, greedy, temperature, seeds."""

from __future__ import annotations

import math

import pytest
import torch

from lvm_pl.console import UserError
from lvm_pl.lvm.sampling import check_sampling, process_logits, sample, top_k_filter, top_p_filter


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


def test_process_logits_keeps_only_codebook_ids_at_their_own_index():
    logits = torch.arange(12.0).expand(2, 12)  # the specials 8..11 are the largest
    out = process_logits(logits, codebook_size=8)
    assert out.shape == (2, 8) and torch.equal(out, logits[:, :8])


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.0, 0.5, 2.5])
    assert kept(top_k_filter(logits, 3)) == {1, 3, 5}
    assert kept(top_k_filter(logits, 1)) == {1}
    assert kept(top_k_filter(logits, 100)) == set(range(6))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.1, 0.3, 0.05])
    logits = probs.log()
    # sorted: 0.5 (1), 0.3 (3), 0.1 (2), 0.05, 0.05 -> cumulative 0.5, 0.8, 0.9, ...
    assert kept(top_p_filter(logits, 0.5)) == {1}
    assert kept(top_p_filter(logits, 0.75)) == {1, 3}
    assert kept(top_p_filter(logits, 0.85)) == {1, 3, 2}
    assert kept(top_p_filter(logits, 0.01)) == {1}  # the most likely id always stays
    assert kept(top_p_filter(logits, 1.0)) == set(range(5))


def test_top_p_on_a_batch_filters_each_row_alone():
    logits = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7]]).log()
    out = top_p_filter(logits, 0.6)
    assert kept(out[0]) == {0} and kept(out[1]) == {2}


def test_process_logits_order_special_then_temperature_then_top_k():
    logits = torch.tensor([[1.0, 2.0, 3.0, 9.0, 8.0]])  # ids 3, 4 are special in a codebook of 3
    out = process_logits(logits, codebook_size=3, temperature=2.0, top_k=2)
    assert out.shape == (1, 3) and kept(out[0]) == {1, 2}
    torch.testing.assert_close(out[0, 1:3], torch.tensor([1.0, 1.5]))


def test_greedy_is_argmax_over_codebook_ids_only():
    logits = torch.tensor([[0.0, 5.0, 1.0, 50.0], [3.0, 1.0, 2.0, 60.0]])
    assert sample(logits, codebook_size=3, temperature=0).tolist() == [1, 0]


def test_samples_never_special_and_follow_the_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([math.log(0.2), math.log(0.8), 100.0, 100.0]).expand(4000, 4)
    ids = sample(logits, codebook_size=2, temperature=1.0, generator=g)
    assert set(ids.tolist()) <= {0, 1}
    assert abs(ids.float().mean().item() - 0.8) < 0.03


def test_same_seed_same_draws_other_seed_other_draws():
    logits = torch.randn(64, 50)
    draw = lambda seed: sample(logits, 40, 1.0, top_k=20, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_top_k_one_sampling_equals_greedy():
    logits = torch.randn(16, 30)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, 25, 0.7, top_k=1, generator=g), sample(logits, 25, 0.0))


@pytest.mark.parametrize(
    "kwargs,key", [({"temperature": -1}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 1.5}, "top_p")]
)
def test_bad_settings_are_user_errors_naming_the_key(kwargs, key):
    settings = {"temperature": 1.0, "top_k": None, "top_p": None, **kwargs}
    with pytest.raises(UserError, match=f"generation.{key}"):
        check_sampling(**settings)
