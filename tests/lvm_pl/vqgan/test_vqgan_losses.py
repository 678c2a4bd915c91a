"""VQGAN losses against hand computations, and gradient isolation between autoencoder and discriminator."""

import math

import pytest
import torch
from torch import nn

from lvm_pl.vqgan import losses as L
from lvm_pl.vqgan.discriminators import PatchGAN, StyleGANDiscriminator

REAL = torch.tensor([2.0, 0.5, -1.0])
FAKE = torch.tensor([-2.0, 0.0, 1.5])


def sp(x: float) -> float:
    return math.log1p(math.exp(x))


def test_hinge_by_hand():
    # relu(1 - real) = [0, .5, 2] -> 2.5/3 ; relu(1 + fake) = [0, 1, 2.5] -> 3.5/3
    assert L.d_hinge(REAL, FAKE).item() == pytest.approx(0.5 * (2.5 / 3 + 3.5 / 3))
    assert L.g_hinge(FAKE).item() == pytest.approx(-(-2.0 + 0.0 + 1.5) / 3)


def test_bce_losses_by_hand():
    d = 0.5 * (sum(sp(-r) for r in REAL.tolist()) / 3 + sum(sp(f) for f in FAKE.tolist()) / 3)
    assert L.d_bce(REAL, FAKE).item() == pytest.approx(d, rel=1e-6)
    # non-saturating generator: -log sigmoid(fake) = softplus(-fake)
    assert L.g_non_saturating(FAKE).item() == pytest.approx(sum(sp(-f) for f in FAKE.tolist()) / 3, rel=1e-6)
    # minimax generator: log(1 - sigmoid(fake)) = -softplus(fake)
    assert L.g_vanilla(FAKE).item() == pytest.approx(-sum(sp(f) for f in FAKE.tolist()) / 3, rel=1e-6)
    # the generator improves by raising D(G(z)) in both: gradients are negative
    for g in (L.g_vanilla, L.g_non_saturating, L.g_hinge):
        f = FAKE.clone().requires_grad_(True)
        g(f).backward()
        assert (f.grad < 0).all()


def test_lecam_by_hand():
    ema_real, ema_fake = torch.tensor(0.5), torch.tensor(-0.5)
    # relu(real - (-0.5)) = [2.5, 1, 0] ; relu(0.5 - fake) = [2.5, 0.5, 0]
    expected = (2.5**2 + 1) / 3 + (2.5**2 + 0.25) / 3
    assert L.lecam(REAL, FAKE, ema_real, ema_fake).item() == pytest.approx(expected)


def test_r1_by_hand():
    # D(x) = sum(w * x): grad_x = w for every sample, so the penalty is ||w||^2
    d = nn.Conv2d(1, 1, 1, bias=False)
    d.weight.data.fill_(3.0)
    x = torch.randn(4, 1, 2, 2)
    assert L.r1_penalty(d, x).item() == pytest.approx(9.0 * 4)


def test_adaptive_weight_by_hand():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    rec = (3 * w).sum()  # grad [3, 3] -> norm sqrt(18)
    g = (w * w).sum()  # grad 2w = [2, 4] -> norm sqrt(20)
    assert L.adaptive_weight(rec, g, w).item() == pytest.approx(math.sqrt(18) / (math.sqrt(20) + 1e-4), rel=1e-6)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def _loss(**kw) -> L.VQGANLoss:
    kw.setdefault("disc_start", 0)
    return L.VQGANLoss(PatchGAN(channels=8, num_layers=2, norm="group"), perceptual=None, **kw)


@pytest.mark.parametrize("adversarial", ["hinge", "vanilla", "non_saturating"])
def test_gradient_isolation(adversarial):
    torch.manual_seed(0)
    gen = _Toy()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    loss = _loss(adversarial=adversarial, lecam_weight=0.1, r1_weight=0.1)
    recon = gen(x)
    _, logs = loss(x, recon, torch.zeros(()), gen.conv.weight, step=0)
    # the generator's adversarial term alone: no gradient on the discriminator
    g = loss.g_loss_fn(loss._frozen_discriminator(gen(x)))
    g.backward()
    assert gen.conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.discriminator.parameters())
    # the discriminator's loss alone: no gradient on the autoencoder
    gen.zero_grad(set_to_none=True)
    recon = gen(x)
    d = loss.d_loss_fn(loss.discriminator(x.detach()), loss.discriminator(recon.detach()))
    d.backward()
    assert gen.conv.weight.grad is None
    assert all(p.grad is not None for p in loss.discriminator.parameters())


def test_total_equals_sum_of_terms_and_gating():
    torch.manual_seed(0)
    gen = _Toy()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    loss = _loss(adaptive=False, disc_weight=0.5, codebook_weight=2.0, reconstruction="l2")
    recon = gen(x)
    total, logs = loss(x, recon, torch.tensor(0.3), gen.conv.weight, step=0)
    rec = (recon - x).pow(2).mean()
    expected = rec + 2.0 * 0.3 + 0.5 * logs["g"] + logs["d"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    gated = _loss(disc_start=10)
    total, logs = gated(x, recon, torch.tensor(0.3), gen.conv.weight, step=5)
    assert "g" not in logs and total.item() == pytest.approx(((recon - x).abs().mean() + 0.3).item(), rel=1e-5)


def test_stylegan_discriminator_shapes():
    d = StyleGANDiscriminator(image_size=32, channels=8)
    assert d(torch.randn(3, 3, 32, 32)).shape == (3, 1)
