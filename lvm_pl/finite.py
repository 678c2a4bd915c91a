"""Non-finite losses: stop with the step and the loss term named (the last good checkpoint stays), or skip the step."""

from __future__ import annotations

from typing import Literal

import torch

from lvm_pl.console import warn

NonFinitePolicy = Literal["stop", "skip"]


class NonFiniteLossError(RuntimeError):
    """Raised when a loss term is NaN/Inf and the policy is `stop`."""


def check_finite(terms: dict[str, torch.Tensor], step: int, policy: NonFinitePolicy = "stop") -> bool:
    """True when every term is finite; else raise (policy `stop`) or warn and return False (policy `skip`).

    The check costs one device sync per step; it is what lets the message name the term.
    """
    bad = [name for name, value in terms.items() if not torch.isfinite(value.detach()).all()]
    if not bad:
        return True
    values = ", ".join(f"{n}={terms[n].detach().float().mean().item()}" for n in bad)
    message = f"non-finite loss at step {step}: {values}"
    if policy == "stop":
        raise NonFiniteLossError(message + " - training stopped; the last saved checkpoint is untouched")
    warn(message + " - step skipped (non_finite: skip)")
    return False
