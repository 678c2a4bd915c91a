"""The one lookup of TensorBoard among a run's loggers (images, histograms and custom-step scalars go there)."""

from __future__ import annotations

from collections.abc import Iterable

from lightning.pytorch.loggers import Logger, TensorBoardLogger


def tensorboard(loggers: Iterable[Logger]):
    """The `SummaryWriter` of the first TensorBoard logger in `loggers` (a module's or trainer's `.loggers`), or
    None when the run logs elsewhere or not at all."""
    logger = next((lg for lg in loggers if isinstance(lg, TensorBoardLogger)), None)
    return logger.experiment if logger is not None else None
