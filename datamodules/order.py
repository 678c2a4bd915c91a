"""The training order both DataModules share: a permutation by (seed, epoch), split across ranks, resumable.

`TrainOrder` builds each epoch's sampler, checkpoints how far this rank got (Lightning saves the DataModule's
`state_dict`) and makes the next sampler start there, so a resumed `fit` sees exactly the items the interrupted one
had not trained on.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import DataLoader, DistributedSampler

from lvm_pl.console import warn


class OrderSampler(DistributedSampler):
    """Item order for one rank: a permutation by (seed, epoch), split across ranks, able to skip consumed items.

    A `DistributedSampler` so Lightning leaves it in place under DDP. `even` pads with repeated items so every rank
    takes the same number of steps (training); without it each item is seen once (evaluation). `resume(epoch,
    consumed)` makes the next iteration start where a checkpointed run stopped.
    """

    def __init__(self, num_items: int, num_replicas: int, rank: int, shuffle: bool, seed: int, even: bool = True):
        super().__init__(range(num_items), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        if not even:
            self.total_size = num_items
            self.num_samples = len(range(rank, num_items, num_replicas))
        self._skip = 0
        self.started = False

    def resume(self, epoch: int, consumed: int) -> None:
        """Start the next iteration at item `consumed` of `epoch` (an epoch fully consumed moves to the next)."""
        if consumed >= self.num_samples:
            epoch, consumed = epoch + 1, 0
        self.epoch, self._skip = epoch, consumed

    def __iter__(self):
        self.started = True
        skip, self._skip = self._skip, 0
        n = len(self.dataset)
        order = np.random.default_rng((self.seed, self.epoch)).permutation(n) if self.shuffle else np.arange(n)
        order = np.resize(order, self.total_size)  # pads by repeating from the start, as DistributedSampler does
        return iter(order[self.rank : self.total_size : self.num_replicas][skip:].tolist())


class TrainLoader(DataLoader):
    """A DataLoader Lightning recognizes as resumable; the position it restores is the sampler's (`TrainOrder`)."""

    def state_dict(self) -> dict:
        return {}  # the data module checkpoints the position: the loop's count is exact, this loader's is prefetched

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class TrainOrder:
    """The resumable training order of one DataModule (`batch_size` items a step, shuffled by `seed` or not)."""

    def __init__(self, batch_size: int, seed: int, shuffle: bool = True) -> None:
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.sampler: OrderSampler | None = None
        self._pending: dict | None = None

    def new_sampler(self, num_items: int, trainer) -> OrderSampler:
        """This rank's sampler over `num_items` items, starting where a restored checkpoint stopped."""
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.sampler = OrderSampler(num_items, world, rank, shuffle=self.shuffle, seed=self.seed)
        if self._pending is not None:
            self._resume(self._pending)
            self._pending = None
        return self.sampler

    def state_dict(self, trainer) -> dict:
        """Epoch and items this rank consumed, and what the order depends on."""
        if trainer is None or self.sampler is None:
            return {}
        # the loop's count, not the loader's: Lightning prefetches a batch the model has not trained on yet
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        return {"epoch": trainer.current_epoch, "consumed": batches * self.batch_size, **self._depends()}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if self.sampler is None:
            self._pending = dict(state)  # usual case: restored before the train loader is built
        elif self.sampler.started:
            warn(
                "data: the train loader was iterated before the checkpoint was restored (strategies that restore after"
                " setup); this epoch restarts from its first item"
            )
        else:
            self._resume(state)

    def _depends(self) -> dict:
        s = self.sampler
        return {"num_items": len(s.dataset), "world_size": s.num_replicas, "seed": s.seed}

    def _resume(self, state: dict) -> None:
        now = self._depends()
        # token checkpoints written before the shared order named the item count `num_windows`
        then = {k: state.get(k, state.get("num_windows")) if k == "num_items" else state.get(k) for k in now}
        if then != now:
            warn(f"data: checkpoint's training order was {then}, now {now}; the epoch restarts from its first item")
            self.sampler.resume(state["epoch"], 0)
        else:
            self.sampler.resume(state["epoch"], state["consumed"])
