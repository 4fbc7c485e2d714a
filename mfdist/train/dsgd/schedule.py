"""The d x d blocking and the strata schedule of DSGD (which blocks each task updates in each sub-epoch)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HELD, MOVING = "held", "moving"


@dataclass(frozen=True)
class Grid:
    """The d x d blocking; ``held`` is the larger side. Block b of a side holds indices b, b + d, b + 2d, ...

    A sub-epoch runs as ``tasks`` Spark tasks (d, or the task slots when d is larger). Task t
    holds the held blocks b with b mod tasks = t; in stratum s it updates every rating block
    (h, m) with h mod tasks = t and m mod tasks = (t + s) mod tasks, one after another. So an
    epoch is ``tasks`` strata whatever d is: with tasks = d that is one block per task and
    stratum (Gemulla's DSGD), with d > tasks the tasks x tasks grid of block groups, each group
    cut into (d / tasks)^2 blocks.
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

    def blocks_of(self, task: int, kind: str, stratum: int) -> range:
        """The blocks of side ``kind`` that ``task`` updates in ``stratum``."""
        group = task if kind == HELD else (task + stratum) % self.tasks
        return range(group, self.d, self.tasks)

    def task_of(self, kind: str, block: int, stratum: int) -> int:
        """The task that updates ``block`` of side ``kind`` in ``stratum`` (a held block: always the same)."""
        group = block % self.tasks
        return group if kind == HELD else (group - stratum) % self.tasks

    def stratum_of(self, held: int, moving: int) -> int:
        """The stratum in which rating block (held, moving) is updated."""
        return (moving % self.tasks - held % self.tasks) % self.tasks


def grid_for(d: int, *, slots: int, users: int, items: int, user_col: str, item_col: str) -> Grid:
    """The grid whose held (stationary) side is the larger one, run as at most ``slots`` tasks per sub-epoch."""
    tasks = max(1, min(d, slots))
    if users >= items:
        return Grid(d, users, items, user_col, item_col, tasks)
    return Grid(d, items, users, item_col, user_col, tasks)


def strata_order(seed: int, epoch: int, strata: int) -> list[int]:
    """The order in which an epoch visits its strata (a seeded permutation)."""
    return [int(s) for s in np.random.default_rng([seed, epoch, 0]).permutation(strata)]
