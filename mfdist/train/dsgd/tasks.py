"""What DSGD runs inside the Python workers: rating layout, the sub-epoch update, factor block rows.

Module-level functions (pickled by reference) over numpy and pyarrow only; the
plans that call them are in :mod:`~mfdist.train.dsgd.layout`,
:mod:`~mfdist.train.dsgd.checkpoint` and :mod:`~mfdist.train.dsgd.trainer`.
Every function is a pure function of its inputs and the seed, so a retried
task (a lost executor, a speculative copy) produces the same bytes.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
import pyarrow as pa

from mfdist import schema as S
from mfdist.hashing import splitmix64
from mfdist.train.dsgd.kernel import NO_ERRORS, BlockErrors, RatingBlock, Side, layout_block, penalty_weights, sgd_block
from mfdist.train.dsgd.schedule import HELD, MOVING, Grid

# The factor penalty of a row grows as (its ratings)^0.6 rather than linearly: on
# MovieLens 100k this took u1 test RMSE from 0.921 to 0.918 at the same reg (see README).
FREQUENCY_EXPONENT = 0.6
# Initial factors ~ N(0, (INIT_SCALE / sqrt(rank))^2): the initial p.q has the same spread at
# every rank. With AdaGrad steps a small start converges fastest (synthetic benchmark: 6 epochs
# to ALS's RMSE at 0.1, 7 at 0.25, 12 at 1.0; MovieLens 100k is the same at 0.1 and 0.5).
INIT_SCALE = 0.1


class FactorBlock(NamedTuple):
    """Block ``block`` of one side (``kind``): local row r is global index ``block + d * r``."""

    kind: str
    block: int
    vecs: np.ndarray  # float32 (n, rank)
    bias: np.ndarray  # float32 (n,)
    counts: np.ndarray  # int32 (n,) training ratings per row; 0 = untrained, not published
    grad_sq: np.ndarray  # float32 (n,) the rows' AdaGrad sums (see mfdist.train.dsgd.kernel)
    errors: BlockErrors  # a held block: the objective's terms over its ratings so far this epoch


# A checkpoint row per factor block (the epoch's errors travel with the held blocks).
BLOCK_DDL = (
    "kind string, block int, trained int, vecs binary, bias binary, counts binary, grad_sq binary, "
    "sse double, sse_clipped double, penalty double, ratings long"
)
_ARROW_BLOCK_SCHEMA = pa.schema([
    ("kind", pa.string()), ("block", pa.int32()), ("trained", pa.int32()), ("vecs", pa.binary()), ("bias", pa.binary()),
    ("counts", pa.binary()), ("grad_sq", pa.binary()), ("sse", pa.float64()), ("sse_clipped", pa.float64()),
    ("penalty", pa.float64()), ("ratings", pa.int64()),
])
NOTHING_WANTED: dict[str, np.ndarray] = {}


class BlockReport(NamedTuple):
    """What the driver learns of a block as its checkpoint row is written: its epoch errors and a few rows."""

    kind: str
    block: int
    errors: BlockErrors
    idx: np.ndarray  # int32 global indices of the rows asked for
    bias: np.ndarray
    vecs: np.ndarray


@dataclass(frozen=True)
class Hyper:
    """Everything a task needs besides its blocks (small, shipped with the closures)."""

    rank: int
    reg: float
    bias_reg: float
    biases: bool
    mu: float
    rating_range: tuple[float, float]
    mean_held: float  # mean ratings per trained row, for the penalty weights
    mean_moving: float

    def side(self, fb: FactorBlock) -> Side:
        mean = self.mean_held if fb.kind == HELD else self.mean_moving
        reg, bias_reg = penalty_weights(fb.counts, reg=self.reg, bias_reg=self.bias_reg, exponent=FREQUENCY_EXPONENT, mean_count=mean)
        return Side(fb.vecs, fb.bias, reg, bias_reg, fb.grad_sq)


# ---- factor blocks as checkpoint rows -------------------------------------------------------


def block_row(fb: FactorBlock) -> tuple:
    """``fb`` as a row of BLOCK_DDL."""
    return (
        fb.kind, fb.block, int((fb.counts > 0).sum()), fb.vecs.tobytes(), fb.bias.tobytes(), fb.counts.tobytes(),
        fb.grad_sq.tobytes(), *fb.errors,
    )


def reported_row(fb: FactorBlock, *, report, wanted: dict[str, np.ndarray], d: int) -> tuple:
    """``fb``'s checkpoint row; adds a BlockReport with its rows among ``wanted[fb.kind]`` to the accumulator ``report``.

    The row is written by the write job's result stage, whose accumulator updates Spark applies
    once per partition however often a task is retried.
    """
    idx = wanted.get(fb.kind, np.zeros(0, np.int64))
    idx = idx[idx % d == fb.block]
    local = idx // d
    report.add([BlockReport(fb.kind, fb.block, fb.errors, idx.astype(np.int32), fb.bias[local], fb.vecs[local])])
    return block_row(fb)


def fresh(fb: FactorBlock) -> FactorBlock:
    """``fb`` at the start of an epoch: no errors counted yet."""
    return fb._replace(errors=NO_ERRORS)


def from_text(value: str, dtype) -> np.ndarray:
    """An array sent as base64 text (a binary column of :func:`mfdist.train.dsgd.layout.rows_of`), read-only."""
    return np.frombuffer(base64.b64decode(value), dtype)


def from_row(row, *, rank: int) -> FactorBlock:
    """A checkpoint row of :func:`~mfdist.train.dsgd.layout.rows_of` as a FactorBlock with writable arrays, starting an epoch (no errors yet)."""
    def array(name: str, dtype) -> np.ndarray:
        return from_text(row[name], dtype).copy()

    return FactorBlock(
        row["kind"], row["block"], array("vecs", np.float32).reshape(-1, rank), array("bias", np.float32),
        array("counts", np.int32), array("grad_sq", np.float32), NO_ERRORS,
    )


# Epoch 0's inputs: each input task's rating counts of the rows of a block (sparse), and warm-start rows.
COUNTS_DDL = "_kind string, _block int, _rows binary, _n binary"
_COUNTS_SCHEMA = pa.schema([("_kind", pa.string()), ("_block", pa.int32()), ("_rows", pa.binary()), ("_n", pa.binary())])
WARM_DDL = f"_kind string, _block int, _row int, _wb float, _wv {S.FACTOR_TYPE.simpleString()}"


def row_counts(batches: Iterator[pa.RecordBatch], *, d: int) -> Iterator[pa.RecordBatch]:
    """One input task's ratings (held, moving index) as counts per row: a row (kind, block, local rows, counts) per block.

    Sparse (only the rows the task has), so a task's output is bounded by its input, whatever the sides' sizes.
    """
    found = [b for b in batches if b.num_rows]
    if not found:
        return
    table = pa.Table.from_batches(found)
    for kind in (HELD, MOVING):
        idx, n = np.unique(table.column(kind).to_numpy(), return_counts=True)
        block = idx % d
        order = np.argsort(block, kind="stable")  # rows stay ascending within a block
        idx, n, block = idx[order], n[order], block[order]
        starts = np.concatenate(([0], np.flatnonzero(np.diff(block)) + 1))
        ends = np.concatenate((starts[1:], [len(idx)]))
        yield pa.RecordBatch.from_pydict({
            "_kind": [kind] * len(starts), "_block": block[starts].astype(np.int32),
            "_rows": [(idx[lo:hi] // d).astype(np.int32).tobytes() for lo, hi in zip(starts, ends)],
            "_n": [n[lo:hi].astype(np.int32).tobytes() for lo, hi in zip(starts, ends)],
        }, schema=_COUNTS_SCHEMA)


def initial_block(counts: pa.Table, warm: pa.Table, *, grid: Grid, rank: int, seed: int) -> pa.Table:
    """Epoch 0 of one block: a cogroup of its input tasks' row counts (:func:`row_counts`) with its warm-start rows.

    Random factors on trained rows (seeded by side and block) and zero biases, except where a
    warm start gives a trained row's bias (_wb) and factors (_wv); AdaGrad sums of 1.
    """
    kind, b = counts.column("_kind")[0].as_py(), counts.column("_block")[0].as_py()
    size = grid.block_rows(kind, b)
    rows = np.concatenate([np.frombuffer(v, np.int32) for v in counts.column("_rows").to_pylist()])
    parts = np.concatenate([np.frombuffer(v, np.int32) for v in counts.column("_n").to_pylist()])
    n = np.bincount(rows, weights=parts, minlength=size).astype(np.int32)
    rng = np.random.default_rng([seed, 0 if kind == HELD else 1, b])
    vecs = (rng.standard_normal((size, rank)) * (INIT_SCALE / math.sqrt(rank))).astype(np.float32)
    vecs[n == 0] = 0.0  # untrained rows predict with the bias model, as evaluate does
    bias = np.zeros(size, np.float32)
    if warm.num_rows:
        warm_rows = warm.column("_row").to_numpy()
        factors = warm.column("_wv").combine_chunks()
        # Only rows trained now take the base run's values (an id of the base run may have no ratings here).
        trained = np.zeros(len(warm_rows), bool)
        inside = warm_rows < size
        trained[inside] = n[warm_rows[inside]] > 0
        has = factors.is_valid().to_numpy(zero_copy_only=False) & trained
        vecs[warm_rows[has]] = factors.filter(has).flatten().to_numpy().reshape(-1, rank)
        bias[warm_rows[has]] = warm.column("_wb").to_numpy()[has]
    fb = FactorBlock(kind, b, vecs, bias, n, np.ones(size, np.float32), NO_ERRORS)
    return pa.Table.from_pylist([dict(zip(_ARROW_BLOCK_SCHEMA.names, block_row(fb)))], schema=_ARROW_BLOCK_SCHEMA)


def model_rows(batches: Iterator[pa.RecordBatch], *, d: int, rank: int, idx_col: str) -> Iterator[pa.RecordBatch]:
    """Model rows (idx, bias, factors) of the trained rows of the checkpoint rows in ``batches``."""
    element = pa.list_(pa.field("element", pa.float32(), nullable=False))
    for batch in batches:
        cols = {name: batch.column(name).to_pylist() for name in ("block", "vecs", "bias", "counts")}
        for block, vecs, bias, counts in zip(*cols.values()):
            keep = np.flatnonzero(np.frombuffer(counts, np.int32) > 0)
            factors = np.frombuffer(vecs, np.float32).reshape(-1, rank)[keep]
            flat = pa.FixedSizeListArray.from_arrays(pa.array(factors.ravel(), pa.float32()), rank).cast(element)
            yield pa.RecordBatch.from_arrays(
                [pa.array((block + d * keep).astype(np.int32)), pa.array(np.frombuffer(bias, np.float32)[keep]), flat],
                names=[idx_col, S.BIAS, S.FACTORS],
            )


# ---- the rating strata ----------------------------------------------------------------------

PIECE_DDL = "_b int, _m int, rows binary, cols binary, vals binary"
_PIECE_SCHEMA = pa.schema([
    ("_b", pa.int32()), ("_m", pa.int32()), ("rows", pa.binary()), ("cols", pa.binary()), ("vals", pa.binary()),
])


def cut_by_block(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """One input task's cells of one stratum (_b, _m, _r, _c, _v) cut by rating block: a row of columnar bytes per piece.

    No sort and no Arrow grouping in Spark: the pieces of a block from all input tasks meet in
    one shuffle, where the block is laid out (:func:`layout_partition`).
    """
    found = [b for b in batches if b.num_rows]
    if not found:
        return
    table = pa.Table.from_batches(found)
    col = {name: table.column(name).to_numpy() for name in ("_b", "_m", "_r", "_c", "_v")}
    order = np.lexsort((col["_m"], col["_b"]))
    held, moving = col["_b"][order], col["_m"][order]
    starts = np.concatenate(([0], np.flatnonzero((np.diff(held) != 0) | (np.diff(moving) != 0)) + 1, [len(order)]))
    for lo, hi in zip(starts[:-1], starts[1:]):
        part = order[lo:hi]
        yield pa.RecordBatch.from_pydict({
            "_b": [int(held[lo])], "_m": [int(moving[lo])], "rows": [col["_r"][part].astype(np.int32).tobytes()],
            "cols": [col["_c"][part].astype(np.int32).tobytes()], "vals": [col["_v"][part].astype(np.float32).tobytes()],
        }, schema=_PIECE_SCHEMA)


def unpack_piece(row) -> tuple[int, tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """(held block, (moving block, rows, cols, vals)) of a row of :func:`~mfdist.train.dsgd.layout.rows_of`: keyed by
    the held block, which names the task."""
    arrays = (from_text(row["rows"], np.int32), from_text(row["cols"], np.int32), from_text(row["vals"], np.float32))
    return row["_b"], (row["_m"], *arrays)


def layout_partition(t: int, pieces: Iterator[tuple[int, tuple]], *, grid: Grid, stratum: int, rank: int,
                     seed: int) -> list[list[tuple[int, int, RatingBlock]]]:
    """Task t's rating blocks of ``stratum``: (h, m, block) for its held blocks h and moving blocks m, each laid
    out (empty when it has no ratings)."""
    parts: dict[tuple[int, int], list] = {}
    for h, (m, *piece) in pieces:
        parts.setdefault((h, m), []).append(piece)
    empty = (np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32))
    blocks = []
    for h in grid.blocks_of(t, HELD, stratum):
        for m in grid.blocks_of(t, MOVING, stratum):
            rows, cols, vals = (np.concatenate(a) for a in zip(*parts[h, m])) if (h, m) in parts else empty
            blocks.append((h, m, layout_block(rows, cols, vals, rank=rank, seed=block_seed(seed, cell(h, m, grid.d), h))))
    return [blocks]


def cell(held: int, moving: int, d: int) -> int:
    """Rating block (held, moving)'s diagonal (moving - held) mod d: with held, the block's name in seeds."""
    return (moving - held) % d


def block_seed(seed: int, *parts: int) -> int:
    key = np.uint64(seed)
    for p in parts:
        key = splitmix64(np.array([key ^ np.uint64(p)], dtype=np.uint64))[0]
    return int(key >> np.uint64(1))


# ---- a sub-epoch ----------------------------------------------------------------------------


def route(fb: FactorBlock, *, stratum: int, grid: Grid) -> tuple[int, FactorBlock]:
    """(the task that updates ``fb`` in ``stratum``, fb): the key of the sub-epoch's shuffle."""
    return grid.task_of(fb.kind, fb.block, stratum), fb


def update(item: tuple[list[tuple[int, int, RatingBlock]], list[tuple[int, FactorBlock]]], *, hyper: Hyper, d: int, lr: float,
           seed: int, epoch: int) -> list[FactorBlock]:
    """One task of a sub-epoch: SGD over each of its rating blocks (h, m) with the two factor blocks it joins;
    returns the task's factor blocks, updated.

    A held block adds the pass's objective terms to its epoch's sums. The visiting order of
    a block's sub-blocks is seeded by (seed, epoch, the block), so a retry repeats it.
    """
    ratings, routed = item
    held = {fb.block: fb for _, fb in routed if fb.kind == HELD}
    moving = {fb.block: fb for _, fb in routed if fb.kind == MOVING}
    for h, m, block in ratings:
        rows, cols = held[h], moving[m]
        order = np.random.default_rng([seed, epoch, 1 + cell(h, m, d), h]).permutation(block.n_sub)
        errors = sgd_block(
            block, order, hyper.side(rows), hyper.side(cols), mu=hyper.mu, lr=lr, biases=hyper.biases, rating_range=hyper.rating_range,
        )
        held[h] = rows._replace(errors=rows.errors.plus(errors))
    return [*held.values(), *moving.values()]
