"""Quantizers: straight-through gradients, index ranges, EMA updates, dead-code restart, FSQ round trips."""

import pytest
import torch

from lvm_pl.vqgan.quantizers import FSQ, VectorQuantizer


@pytest.mark.parametrize("kw", [{}, {"normalize": True}, {"code_dim": 4}, {"ema_decay": 0.9}, {"init_from_data": True}])
def test_vq_straight_through_and_range(kw):
    torch.manual_seed(0)
    q = VectorQuantizer(codebook_size=16, embed_dim=8, **kw).train()
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    out = q(z)
    assert out.indices.shape == (2, 4, 4) and out.indices.dtype == torch.long
    assert out.indices.min() >= 0 and out.indices.max() < 16
    assert int(out.counts.sum()) == 32
    out.quantized.backward(torch.ones_like(out.quantized))
    if "code_dim" not in kw and "normalize" not in kw:
        assert torch.equal(z.grad, torch.ones_like(z))  # identity gradient through the quantizer
    else:
        assert z.grad.abs().sum() > 0
    ev = q.eval()(z.detach())  # after the training step's EMA/init updates, embed agrees with the lookup
    assert torch.allclose(q.embed(ev.indices), ev.quantized, atol=1e-6)


def test_vq_picks_nearest_code_and_loss_by_hand():
    q = VectorQuantizer(codebook_size=2, embed_dim=1, beta=0.25)
    q.embedding.weight.data = torch.tensor([[0.0], [1.0]])
    z = torch.tensor([0.2, 0.9, 2.0]).view(1, 1, 1, 3)
    out = q.eval()(z)
    assert out.indices.tolist() == [[[0, 1, 1]]]
    mse = (0.2**2 + 0.1**2 + 1.0**2) / 3
    assert out.loss.item() == pytest.approx(1.25 * mse, rel=1e-6)  # codebook term + 0.25 * commitment


def test_vq_distances_fp32_under_bf16_autocast():
    q = VectorQuantizer(codebook_size=8, embed_dim=4)
    z = torch.randn(1, 4, 2, 2)
    ref = q.eval()(z).indices
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(q(z).indices, ref)


def test_ema_update_by_hand():
    q = VectorQuantizer(codebook_size=2, embed_dim=1, ema_decay=0.5).train()
    q.embedding.weight.data = torch.tensor([[0.0], [10.0]])
    q.embed_sum.copy_(q.embedding.weight.data)
    q.cluster_size.fill_(1.0)
    q(torch.tensor([1.0, 3.0]).view(1, 1, 1, 2))  # both nearest code 0: sum 4, count 2
    size0 = 0.5 * 1 + 0.5 * 2
    assert q.cluster_size.tolist() == pytest.approx([size0, 0.5])
    assert q.embed_sum[0].item() == pytest.approx(0.5 * 0 + 0.5 * 4)
    n = size0 + 0.5
    smoothed0 = (size0 + 1e-5) / (n + 2e-5) * n
    assert q.embedding.weight[0].item() == pytest.approx(2.0 / smoothed0, rel=1e-5)
    assert not q.embedding.weight.requires_grad


def test_dead_code_restart_from_encoder_outputs():
    torch.manual_seed(0)
    q = VectorQuantizer(codebook_size=4, embed_dim=2, dead_code_threshold=0.5).train()
    q.embedding.weight.data = torch.tensor([[0.0, 0.0], [100.0, 100.0], [200.0, 200.0], [300.0, 300.0]])
    z = torch.randn(1, 2, 4, 4) * 0.1 + 5.0
    for _ in range(100):  # codes 1..3 are never picked; their usage EMA decays below 0.5
        q(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    codes = q.embedding.weight.data
    for k in (1, 2, 3):
        assert (codes[k] - flat).norm(dim=1).min() < 1e-6  # replaced by an actual encoder output


def test_init_from_data():
    torch.manual_seed(0)
    q = VectorQuantizer(codebook_size=4, embed_dim=2, init_from_data=True).train()
    z = torch.randn(1, 2, 4, 4) + 50
    q(z)
    assert bool(q.initialized) and (q.embedding.weight.data.mean() - 50).abs() < 2


def test_fsq_round_trip_and_gradient():
    torch.manual_seed(0)
    q = FSQ(levels=[8, 5, 5, 3], embed_dim=4)
    assert q.codebook_size == 8 * 5 * 5 * 3
    z = (torch.randn(2, 4, 3, 3) * 3).requires_grad_(True)
    out = q(z)
    assert out.indices.min() >= 0 and out.indices.max() < q.codebook_size
    assert torch.allclose(q.embed(out.indices), out.quantized, atol=1e-6)
    out.quantized.sum().backward()
    assert z.grad.abs().sum() > 0
    every = torch.arange(q.codebook_size).view(1, 1, -1)
    grid = q.embed(every)[0, :, 0, :].t()  # [K, d]: every code decodes to a distinct point of the level grid
    assert grid.unique(dim=0).shape[0] == q.codebook_size and grid.abs().max() <= 1
