"""The LVM's run settings, grouped: the optimizer and its schedule, and what `test` evaluates. (Sampling for
`predict` is `lvm_pl.lvm.generation.GenerationSettings`.) Each validates where it is built."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lvm_pl.console import UserError


@dataclass
class OptimSettings:
    """AdamW, optionally without weight decay on norms, embeddings and biases (`exclude_from_decay`); the schedule
    warms up linearly to `lr` over `warmup_steps`, then follows a cosine to `min_lr` at `decay_steps` (default: the
    Trainer's total steps) and stays there."""

    lr: float = 1e-3
    min_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    exclude_from_decay: bool = True
    warmup_steps: int = 0
    decay_steps: int | None = None

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise UserError(f"model.optim: lr={self.lr} must be > 0 and min_lr={self.min_lr} within [0, lr]")
        if self.warmup_steps < 0 or (self.decay_steps is not None and self.decay_steps < 1):
            raise UserError(
                f"model.optim: warmup_steps={self.warmup_steps} must be >= 0, decay_steps={self.decay_steps} >= 1"
            )
        if self.weight_decay < 0 or not all(0 <= b < 1 for b in self.betas):
            raise UserError(f"model.optim: weight_decay={self.weight_decay} >= 0 and betas={self.betas} in [0, 1)")


@dataclass
class EvalSettings:
    """What `test` measures beside perplexity: the context-length study over 1..`context_frames` frames (0: off) and
    greedy next-frame quality on up to `next_frame_examples` sentences (0: off); `num_preview` rows of the validation
    preview grid in TensorBoard."""

    context_frames: int = 0
    next_frame_examples: int = 0
    num_preview: int = 4

    def __post_init__(self) -> None:
        if min(self.context_frames, self.next_frame_examples, self.num_preview) < 0:
            raise UserError(f"model.evaluation: every setting must be >= 0, got {asdict(self)}")


def settings(cls, value):
    """`value` as a `cls` instance: a checkpoint's hyper-parameters hand settings back as plain dicts."""
    if value is None:
        return cls()
    return cls(**value) if isinstance(value, dict) else value
