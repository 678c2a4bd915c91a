"""The VQGAN loss: reconstruction + perceptual + codebook + adversarial (generator and discriminator in one sum).

Gradients are kept apart inside: the generator's adversarial term runs the discriminator with detached parameters
(torch.func.functional_call), the discriminator sees detached reconstructions. One optimizer can then step both
parameter groups from the single total, which is what DeepSpeed (one optimizer) and FSDP need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lvm_pl.vqgan.perceptual import LPIPS


def d_hinge(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
    return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())


def d_bce(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (BCE(D(x), 1) + BCE(D(G(z)), 0)): the discriminator of both vanilla and non-saturating GANs."""
    real_loss = F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
    return 0.5 * (real_loss + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))


def g_hinge(fake: torch.Tensor) -> torch.Tensor:
    """-E[D(G(z))]."""
    return -fake.mean()


def g_vanilla(fake: torch.Tensor) -> torch.Tensor:
    """The minimax generator: minimise E[log(1 - sigmoid(D(G(z))))] = -BCE(D(G(z)), 0)."""
    return -F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))


def g_non_saturating(fake: torch.Tensor) -> torch.Tensor:
    """BCE(input=D(G(z)), target=1) = E[softplus(-D(G(z)))]."""
    return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


ADVERSARIAL = {"hinge": (d_hinge, g_hinge), "vanilla": (d_bce, g_vanilla), "non_saturating": (d_bce, g_non_saturating)}


def lecam(real: torch.Tensor, fake: torch.Tensor, ema_real: torch.Tensor, ema_fake: torch.Tensor) -> torch.Tensor:
    """LeCam regulariser (Tseng et al. 2021): E[relu(D(x) - ema_fake)^2] + E[relu(ema_real - D(G(z)))^2]."""
    return F.relu(real - ema_fake).pow(2).mean() + F.relu(ema_real - fake).pow(2).mean()


def r1_penalty(discriminator: nn.Module, real: torch.Tensor) -> torch.Tensor:
    """E[||grad_x D(x)||^2] on real images (multiply by gamma/2 outside)."""
    real = real.detach().requires_grad_(True)
    logits = discriminator(real)
    (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """||d rec / d last|| / (||d g / d last|| + 1e-4), clamped to [0, 1e4] and detached (taming's VQGAN)."""
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


class VQGANLoss(nn.Module):
    """All VQGAN loss terms, their weights from the config; returns the total and a dict of logged values."""

    def __init__(
        self,
        discriminator: nn.Module,
        perceptual: LPIPS | None = None,
        reconstruction: str = "l1",
        reconstruction_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        codebook_weight: float = 1.0,
        adversarial: str = "hinge",
        disc_weight: float = 0.1,
        adaptive: bool = True,
        disc_start: int = 0,
        lecam_weight: float = 0.0,
        lecam_decay: float = 0.999,
        r1_weight: float = 0.0,
    ):
        """`adaptive: false` uses `disc_weight` as a fixed generator weight; both GAN terms are off before
        `disc_start` steps. `r1_weight` is gamma/2 of the R1 penalty."""
        super().__init__()
        if reconstruction not in ("l1", "l2"):
            raise ValueError(f"reconstruction must be l1 or l2, got {reconstruction!r}")
        if adversarial not in ADVERSARIAL:
            raise ValueError(f"adversarial must be one of {sorted(ADVERSARIAL)}, got {adversarial!r}")
        self.discriminator = discriminator
        # held outside the module tree: a frozen feature extractor is neither trained nor saved in checkpoints
        object.__setattr__(self, "perceptual", perceptual)
        self.reconstruction = reconstruction
        self.reconstruction_weight = reconstruction_weight
        self.perceptual_weight = perceptual_weight
        self.codebook_weight = codebook_weight
        self.d_loss_fn, self.g_loss_fn = ADVERSARIAL[adversarial]
        self.disc_weight = disc_weight
        self.adaptive = adaptive
        self.disc_start = disc_start
        self.lecam_weight = lecam_weight
        self.lecam_decay = lecam_decay
        self.r1_weight = r1_weight
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def perceptual_distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """LPIPS [B] if a perceptual network is configured, else None."""
        if self.perceptual is None:
            return None
        self.perceptual.to(x.device)
        return self.perceptual(x.float(), y.float())

    def _frozen_discriminator(self, x: torch.Tensor) -> torch.Tensor:
        params = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        return functional_call(self.discriminator, params, (x,))

    def forward(
        self,
        inputs: torch.Tensor,
        recon: torch.Tensor,
        codebook_loss: torch.Tensor,
        last_layer: torch.Tensor,
        step: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """inputs, recon [B, 3, H, W]; returns (generator + discriminator total, logs)."""
        diff = recon.float() - inputs.float()
        rec = diff.abs().mean() if self.reconstruction == "l1" else diff.pow(2).mean()
        nll = self.reconstruction_weight * rec
        logs = {"rec": rec.detach()}
        if self.perceptual_weight > 0 and self.perceptual is not None:
            p = self.perceptual_distance(inputs, recon).mean()
            nll = nll + self.perceptual_weight * p
            logs["perceptual"] = p.detach()
        total = nll + self.codebook_weight * codebook_loss
        logs["codebook"] = codebook_loss.detach()
        if step < self.disc_start or self.disc_weight == 0:
            logs["total"] = total.detach()
            return total, logs
        # generator: the discriminator's parameters are detached, so this term trains only the autoencoder
        g = self.g_loss_fn(self._frozen_discriminator(recon).float())
        if self.adaptive and torch.is_grad_enabled():
            weight = self.disc_weight * adaptive_weight(nll, g, last_layer)
        else:
            weight = torch.tensor(self.disc_weight, device=g.device)
        # discriminator: reconstructions are detached, so this term trains only the discriminator
        real = self.discriminator(inputs.detach()).float()
        fake = self.discriminator(recon.detach()).float()
        d = self.d_loss_fn(real, fake)
        if self.lecam_weight > 0:
            reg = lecam(real, fake, self.ema_real, self.ema_fake)
            d = d + self.lecam_weight * reg
            logs["lecam"] = reg.detach()
            if self.training:
                with torch.no_grad():
                    self.ema_real.lerp_(real.mean(), 1 - self.lecam_decay)
                    self.ema_fake.lerp_(fake.mean(), 1 - self.lecam_decay)
        if self.r1_weight > 0 and torch.is_grad_enabled():
            r1 = r1_penalty(self.discriminator, inputs)
            d = d + self.r1_weight * r1
            logs["r1"] = r1.detach()
        total = total + weight * g + d
        logs |= {
            "g": g.detach(),
            "d": d.detach(),
            "adaptive_weight": weight.detach(),
            "logits_real": real.mean().detach(),
            "logits_fake": fake.mean().detach(),
            "total": total.detach(),
        }
        return total, logs
