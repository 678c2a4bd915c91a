"""An epoch's draw order over weighted sources that does not depend on the number of ranks, and its resumable sampler.

The epoch is one global sequence of (source, item) keys: each source's items in an order shuffled by (seed, epoch)
at chunk granularity (chunks permuted, then the items inside each), taken without replacement and interleaved by
weight. The source that runs out first ends the epoch: `take_i = floor(p_i * min_j(n_j / p_j))` items of source i.
The interleave is made of blocks of `block` draws holding fixed per-source counts (proportions exact to 1/block),
each block permuted by (seed, epoch, block); memory is O(chunks + block), never O(items).

Global step s of a run on W ranks hands rank r the keys [(s*W + r)*B, +B) past where the epoch resumed. A
checkpoint stores how many keys the whole run consumed, so a resumed epoch continues at that key on any W: no key
seen twice or skipped. The last < W*B keys of an epoch's plan are left for the next epoch (all ranks step alike).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import DistributedSampler

from lvm_pl.console import UserError, warn


def block_counts(weights: list[float], block: int) -> np.ndarray:
    """Per-source draws in a block of `block`: largest-remainder rounding of `p_i * block` (sum exactly `block`)."""
    p = np.asarray(weights, dtype=np.float64) / float(sum(weights))
    exact = p * block
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: block - int(counts.sum())]] += 1
    return counts


class SourceOrder:
    """One source's items for an epoch, in chunk-shuffled order: `key(j)` is the item index of draw j."""

    def __init__(self, chunk_sizes: list[int], seed: int, epoch: int, source: int, shuffle: bool) -> None:
        sizes = np.asarray(chunk_sizes, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        rng = np.random.default_rng((seed, epoch, source))
        self.chunks = rng.permutation(len(sizes)) if shuffle else np.arange(len(sizes))
        self.sizes, self.starts = sizes[self.chunks], starts[self.chunks]
        self.bounds = np.concatenate([[0], np.cumsum(self.sizes)])  # [chunks + 1] draws before each visited chunk
        self.seed, self.epoch, self.source, self.shuffle = seed, epoch, source, shuffle
        self._chunk, self._inner = -1, np.zeros(0, dtype=np.int64)

    def key(self, j: int) -> int:
        c = int(np.searchsorted(self.bounds, j, side="right")) - 1
        if c != self._chunk:  # draws come in order, so one chunk's permutation is made once
            n = int(self.sizes[c])
            rng = np.random.default_rng((self.seed, self.epoch, self.source, int(self.chunks[c])))
            self._chunk, self._inner = c, rng.permutation(n) if self.shuffle else np.arange(n)
        return int(self.starts[c] + self._inner[j - self.bounds[c]])


class MixPlan:
    """The global key sequence of one epoch over sources with `chunk_sizes` [source][chunk] and `weights`."""

    def __init__(
        self, chunk_sizes: list[list[int]], weights: list[float], seed: int, epoch: int, shuffle: bool, block: int
    ) -> None:
        sizes = np.asarray([sum(c) for c in chunk_sizes], dtype=np.int64)
        p = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        span = min(float(n) / q for n, q in zip(sizes, p, strict=True) if q > 0)
        self.take = np.minimum(sizes, np.floor(p * span + 1e-9).astype(np.int64))  # [sources] draws this epoch
        counts = block_counts(weights, block)
        if any(c == 0 and q > 0 for c, q in zip(counts, p, strict=True)):
            least = min(p[p > 0])
            raise UserError(f"data.mix_block: {block} draws give a source of weight {least:.2g} none; raise it")
        self.full_blocks = int(min(t // c for t, c in zip(self.take, counts, strict=True) if c > 0))
        self.counts, self.block, self.seed, self.epoch, self.shuffle = counts, block, seed, epoch, shuffle
        self.rest = self.take - self.full_blocks * counts  # [sources] draws of the last, partial block
        self.length = int(self.take.sum())
        self.orders = [SourceOrder(c, seed, epoch, i, shuffle) for i, c in enumerate(chunk_sizes)]
        self._block, self._labels, self._ranks = -1, np.zeros(0, np.int64), np.zeros(0, np.int64)

    def _load_block(self, b: int) -> None:
        counts = self.counts if b < self.full_blocks else self.rest
        labels = np.repeat(np.arange(len(counts)), counts)
        if self.shuffle:
            labels = np.random.default_rng((self.seed, self.epoch, 1 << 20, b)).permutation(labels)
        ranks = np.zeros(len(labels), dtype=np.int64)  # the j-th draw of its source inside the block
        for i in range(len(counts)):
            ranks[labels == i] = np.arange(int((labels == i).sum()))
        self._block, self._labels, self._ranks = b, labels, ranks

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, g: int) -> tuple[int, int]:
        """(source, item index) of global draw g."""
        b, offset = divmod(g, self.block)
        if b != self._block:
            self._load_block(b)
        i = int(self._labels[offset])
        return i, self.orders[i].key(b * int(self.counts[i]) + int(self._ranks[offset]))


class MixSampler(DistributedSampler):
    """This rank's (source, item) keys of an epoch's `MixPlan`, from global key `start` on.

    A `DistributedSampler` so Lightning leaves it in place under DDP; `set_epoch` (Lightning calls it) picks the plan.
    """

    def __init__(self, order: MixOrder, num_replicas: int, rank: int) -> None:
        super().__init__(range(0), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.order = order
        self.start = 0

    def __len__(self) -> int:
        plan = self.order.plan(self.epoch)
        return (len(plan) - self.start) // (self.num_replicas * self.order.batch_size) * self.order.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        self.start = self.order.begin(self.epoch, self.num_replicas)
        plan, b, w = self.order.plan(self.epoch), self.order.batch_size, self.num_replicas
        for s in range((len(plan) - self.start) // (w * b)):
            first = self.start + (s * w + self.rank) * b
            yield from (plan[g] for g in range(first, first + b))


class MixOrder:
    """The resumable training order of weighted sources: builds samplers, checkpoints the global position."""

    def __init__(
        self, chunk_sizes: list[list[int]], weights: list[float], batch_size: int, seed: int, shuffle: bool, block: int
    ) -> None:
        if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
            raise UserError(f"data.train: source weights {weights} must be >= 0, at least one > 0")
        self.chunk_sizes, self.weights, self.batch_size = chunk_sizes, weights, batch_size
        self.seed, self.shuffle, self.block = seed, shuffle, block
        self.sampler: MixSampler | None = None
        self._plan: MixPlan | None = None
        self._resume: dict | None = None
        self._base = (0, 0)  # (global keys consumed, loop batches done) when this epoch's iteration began
        self._world = 1

    def plan(self, epoch: int) -> MixPlan:
        if self._plan is None or self._plan.epoch != epoch:
            self._plan = MixPlan(self.chunk_sizes, self.weights, self.seed, epoch, self.shuffle, self.block)
        return self._plan

    def new_sampler(self, trainer) -> MixSampler:
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.sampler = MixSampler(self, world, rank)
        if self._resume is not None:
            self.sampler.set_epoch(self._resume["epoch"])
        return self.sampler

    def begin(self, epoch: int, world: int) -> int:
        """The global key this epoch's iteration starts at (a resumed epoch: where the checkpoint stopped)."""
        self._world = world
        state, self._resume = self._resume, None
        if state is not None and state["epoch"] == epoch:
            self._base = (state["consumed"], state["batches"])
        else:
            self._base = (0, 0)
        return self._base[0]

    def depends(self) -> dict:
        return {"sizes": [sum(c) for c in self.chunk_sizes], "weights": list(self.weights), "seed": self.seed}

    def state_dict(self, trainer) -> dict:
        """The epoch and how many of its keys the whole run consumed (the loop's count: Lightning prefetches)."""
        if trainer is None or self.sampler is None:
            return {}
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        consumed = self._base[0] + (batches - self._base[1]) * self._world * self.batch_size
        return {"epoch": trainer.current_epoch, "consumed": consumed, "batches": batches, **self.depends()}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        then = {k: state.get(k) for k in self.depends()}
        if then != self.depends():
            warn(f"data: checkpoint's mix was {then}, now {self.depends()}; the epoch restarts from its first window")
            state = {**state, "consumed": 0}
        self._resume = dict(state)
        if self.sampler is not None:
            self.sampler.set_epoch(state["epoch"])
