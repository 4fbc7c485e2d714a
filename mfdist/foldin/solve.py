"""What fold-in runs inside the Python workers: one ridge solve per row, over a partition sorted by row.

numpy and pyarrow only, so a worker that unpickles :func:`solve_partition` loads
neither the job's driver side nor the trainers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa

from mfdist import schema as S


@dataclass(frozen=True)
class Ridge:
    """The base trainer's penalties on one row with ``n`` ratings: ``factor(n) |p|^2 + bias_reg b^2``."""

    reg: float
    bias_reg: float
    biases: bool
    exponent: float = 1.0  # 1: reg * n (ALS); DSGD: its frequency exponent
    mean_count: float = 1.0  # DSGD: mean ratings per trained row of the side, as in training

    def factor(self, n: int) -> float:
        return self.reg * self.mean_count ** (1.0 - self.exponent) * n ** self.exponent


def solve_row(fixed: np.ndarray, target: np.ndarray, ridge: Ridge) -> tuple[float, np.ndarray]:
    """(bias, factors) minimising ``|target - b - fixed @ p|^2 + ridge`` for one row (float64 normal equations)."""
    n, rank = fixed.shape
    design = np.column_stack([np.ones(n), fixed]) if ridge.biases else fixed
    penalty = np.full(design.shape[1], ridge.factor(n))
    if ridge.biases:
        penalty[0] = ridge.bias_reg
    x = np.linalg.solve(design.T @ design + np.diag(penalty), design.T @ target)
    return (float(x[0]), x[1:]) if ridge.biases else (0.0, x)


_ELEMENT = pa.list_(pa.field("element", pa.float32(), nullable=False))


def dense_side(table: pa.Table, *, idx_col: str, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed side's (idx, bias, factors) rows as (bias, factors) arrays indexed by idx (absent rows: zeros)."""
    idx = table.column(idx_col).to_numpy()
    n = int(idx.max()) + 1 if len(idx) else 0
    bias, factors = np.zeros(n, np.float32), np.zeros((n, rank), np.float32)
    bias[idx] = table.column(S.BIAS).to_numpy()
    factors[idx] = table.column(S.FACTORS).combine_chunks().flatten().to_numpy().reshape(-1, rank)
    return bias, factors


def _solves(keys: np.ndarray, target: np.ndarray, fixed: np.ndarray, *, key: str, rank: int, ridge: Ridge) -> pa.RecordBatch:
    """(key, bias, factors) of each run of equal ``keys``, solved on its rows of ``fixed`` and ``target``."""
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    bounds = np.r_[starts, len(keys)]
    bias = np.empty(len(starts), np.float32)
    factors = np.empty((len(starts), rank), np.float32)
    for j in range(len(starts)):
        lo, hi = bounds[j], bounds[j + 1]
        bias[j], factors[j] = solve_row(fixed[lo:hi], target[lo:hi], ridge)
    vecs = pa.FixedSizeListArray.from_arrays(pa.array(factors.ravel(), pa.float32()), rank).cast(_ELEMENT)
    return pa.RecordBatch.from_arrays([pa.array(keys[starts].astype(np.int32)), pa.array(bias), vecs], names=[key, S.BIAS, S.FACTORS])


def _partition(batches: Iterator[pa.RecordBatch]) -> pa.Table | None:
    """One task's partition of the ratings being folded in, held at once (bounded like a block); None when empty."""
    found = [b for b in batches if b.num_rows]
    return pa.Table.from_batches(found) if found else None


def solve_partition(batches: Iterator[pa.RecordBatch], *, key: str, rank: int, ridge: Ridge) -> Iterator[pa.RecordBatch]:
    """A partition's ratings sorted by ``key`` (key, _y = r - mu - b_fixed, _q = fixed factors) -> each key's (key, bias, factors)."""
    table = _partition(batches)
    if table is None:
        return
    fixed = table.column("_q").combine_chunks().flatten().to_numpy().reshape(-1, rank).astype(np.float64)
    target = table.column("_y").to_numpy().astype(np.float64)
    yield _solves(table.column(key).to_numpy(), target, fixed, key=key, rank=rank, ridge=ridge)


def solve_against(shared, *, key: str, other: str, rank: int, ridge: Ridge) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """mapInArrow body: a partition sorted by ``key`` (key, other, _y = r - mu) solved against the broadcast
    :func:`dense_side` of the fixed side, which each rating looks up by ``other`` in the worker."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        table = _partition(batches)
        if table is None:
            return
        bias, factors = shared.value
        others = table.column(other).to_numpy()
        target = table.column("_y").to_numpy().astype(np.float64) - bias[others]
        yield _solves(table.column(key).to_numpy(), target, factors[others].astype(np.float64), key=key, rank=rank, ridge=ridge)

    return run
