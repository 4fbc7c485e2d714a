"""The d x d blocking and the stratum schedule of DSGD (which block each task updates in each sub-epoch)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HELD, MOVING = "held", "moving"


@dataclass(frozen=True)
class Grid:
    """The d x d blocking; ``held`` is the larger side. Block b of a side holds indices b, b + d, b + 2d, ...

    A sub-epoch runs as ``tasks`` Spark tasks (d, or the task slots when d is larger): task t
    updates the stratum's blocks (b, .) with b mod tasks = t one after another. The blocks of a
    stratum share no rows, so the result does not depend on ``tasks``.
    """

    d: int
    n_held: int
    n_moving: int
    held_col: str
    moving_col: str
    tasks: int

    def block_rows(self, kind: str, block: int) -> int:
        """Rows of ``block`` of the held or moving side (indices block, block + d, ... below the side's size)."""
        n = self.n_held if kind == HELD else self.n_moving
        return max(0, -(-(n - block) // self.d))

    def side_col(self, kind: str) -> str:
        return self.held_col if kind == HELD else self.moving_col


def grid_for(d: int, *, slots: int, users: int, items: int, user_col: str, item_col: str) -> Grid:
    """The grid whose held (stationary) side is the larger one, run as at most ``slots`` tasks per sub-epoch."""
    tasks = max(1, min(d, slots))
    if users >= items:
        return Grid(d, users, items, user_col, item_col, tasks)
    return Grid(d, items, users, item_col, user_col, tasks)


def stratum_blocks(stratum: int, d: int) -> list[tuple[int, int]]:
    """The (held block, moving block) pairs of ``stratum``: task b updates (b, (b + stratum) mod d)."""
    return [(b, (b + stratum) % d) for b in range(d)]


def strata_order(seed: int, epoch: int, d: int) -> list[int]:
    """The order in which an epoch visits the d strata (a seeded permutation)."""
    return [int(s) for s in np.random.default_rng([seed, epoch, 0]).permutation(d)]


def moving_partition(block: int, stratum: int, d: int) -> int:
    """The task (partition) that updates moving ``block`` in ``stratum``."""
    return (block - stratum) % d


def meets(kind: str, block: int, stratum: int, d: int) -> int:
    """The held block that ``block`` of ``kind`` is updated with in ``stratum`` (a held block: itself).

    It is also the key that routes the block to its task (``key mod tasks``), so a held block
    always goes to the same task, and a moving block to the task of the held block it meets.
    """
    return block if kind == HELD else moving_partition(block, stratum, d)
