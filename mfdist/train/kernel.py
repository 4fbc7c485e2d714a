"""The DSGD block kernel: SGD over one block's ratings, compiled with numba (nogil).

A block is laid out once as columnar arrays (``rows``, ``cols`` local row
indices, ``vals`` ratings) sorted into *sub-blocks* of at most
``sub_block_side(rank)`` rows by as many columns, and shuffled inside each
sub-block. A pass walks the sub-blocks in a random order and each sub-block's
ratings sequentially, so the factor rows it touches stay in cache and the
rating arrays are read as a stream (LIBMF's layout; reading the same ratings
through a random index array is several times slower).

Model and update for one rating ``r`` of row ``u`` and column ``i``
(``lr`` the step size; ``rp``, ``rq`` the per-row factor penalties and ``rbp``,
``rbq`` the per-row bias penalties, see :func:`penalty_weights`)::

    e   = r - (mu + bp[u] + bq[i] + P[u] . Q[i])
    bp[u] += lr * (e - rbp[u] * bp[u])           (only when biases are on)
    bq[i] += lr * (e - rbq[i] * bq[i])
    P[u]  += lr * (e * Q[i] - rp[u] * P[u])      (both with the old P[u], Q[i])
    Q[i]  += lr * (e * P[u] - rq[i] * Q[i])

which is SGD on the objective (sums over the ratings)::

    sum (r - r_hat)^2 + sum (rp[u] |P[u]|^2 + rbp[u] bp[u]^2 + rq[i] |Q[i]|^2 + rbq[i] bq[i]^2)

:func:`sgd_block_numpy` is the same pass in plain numpy, the reference for tests.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from mfdist.synth import splitmix64

# Bytes of factor rows per side of a sub-block: a sub-block's rows and columns
# together stay well inside a 1-2 MiB L2 cache.
SUB_BLOCK_BYTES = 256 * 1024


class RatingBlock(NamedTuple):
    """One block's ratings in pass order: sub-block ``s`` is ``[offsets[s], offsets[s + 1])``."""

    rows: np.ndarray  # int32 local row index
    cols: np.ndarray  # int32 local column index
    vals: np.ndarray  # float32 rating
    offsets: np.ndarray  # int64, len = sub-blocks + 1

    @property
    def n_sub(self) -> int:
        return len(self.offsets) - 1


def sub_block_side(rank: int) -> int:
    """Rows (and columns) per sub-block so each side's factors take about SUB_BLOCK_BYTES."""
    return max(16, SUB_BLOCK_BYTES // (4 * rank))


def layout_block(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, *, rank: int, seed: int) -> RatingBlock:
    """Sort a block's (distinct) ratings into sub-blocks, shuffled (seeded) inside each one."""
    side = sub_block_side(rank)
    rows = np.asarray(rows, dtype=np.int32)
    cols = np.asarray(cols, dtype=np.int32)
    n_sub_cols = int(cols.max()) // side + 1 if len(cols) else 1
    sub = (rows.astype(np.int64) // side) * n_sub_cols + cols // side
    # A hash of (row, col) rather than of the position: the layout does not depend on input order.
    cell = (rows.astype(np.uint64) << np.uint64(32)) | cols.astype(np.uint64)
    order = np.lexsort((splitmix64(cell ^ np.uint64(seed)), sub))
    sub = sub[order]
    starts = np.flatnonzero(np.diff(sub)) + 1
    offsets = np.concatenate(([0], starts, [len(sub)])).astype(np.int64) if len(sub) else np.zeros(1, np.int64)
    return RatingBlock(rows[order], cols[order], np.asarray(vals, dtype=np.float32)[order], offsets)


class Side(NamedTuple):
    """One side's factor rows touched by a block, with their per-row penalty weights."""

    vecs: np.ndarray  # float32 (n, rank)
    bias: np.ndarray  # float32 (n,)
    reg: np.ndarray  # float32 (n,) factor penalty per rating
    bias_reg: np.ndarray  # float32 (n,) bias penalty per rating


def penalty_weights(counts: np.ndarray, *, reg: float, bias_reg: float, exponent: float, mean_count: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-rating penalties of rows with ``counts`` ratings: factor and bias weights (float32).

    A row with n ratings pays ``reg * mean_count**(1 - exponent) * n**exponent * |v|^2`` in
    total (exponent 1: the usual per-rating weight) and ``bias_reg * b^2`` for its bias, the
    same bias ridge as the ALS trainer's closed-form biases. Rows without ratings get 0.
    """
    n = np.maximum(counts, 1).astype(np.float64)
    factor = reg * (n / mean_count) ** (exponent - 1.0)
    bias = bias_reg / n
    seen = counts > 0
    return np.where(seen, factor, 0.0).astype(np.float32), np.where(seen, bias, 0.0).astype(np.float32)


@njit(nogil=True, cache=True, fastmath=True, inline="always")
def _predict(P, Q, bp, bq, u, i, mu):  # pragma: no cover - compiled
    pred = mu + bp[u] + bq[i]
    for f in range(P.shape[1]):
        pred += P[u, f] * Q[i, f]
    return pred


@njit(nogil=True, cache=True, fastmath=True)
def _sgd(rows, cols, vals, offsets, order, P, Q, bp, bq, rp, rq, rbp, rbq, mu, lr, biases):  # pragma: no cover - compiled
    k = P.shape[1]
    for s in order:
        for n in range(offsets[s], offsets[s + 1]):
            u = rows[n]
            i = cols[n]
            e = vals[n] - _predict(P, Q, bp, bq, u, i, mu)
            if biases:
                bp[u] += lr * (e - rbp[u] * bp[u])
                bq[i] += lr * (e - rbq[i] * bq[i])
            ru = rp[u]
            ri = rq[i]
            for f in range(k):
                pu = P[u, f]
                qi = Q[i, f]
                P[u, f] = pu + lr * (e * qi - ru * pu)
                Q[i, f] = qi + lr * (e * pu - ri * qi)


def sgd_block(block: RatingBlock, order: np.ndarray, rows: Side, cols: Side, *, mu: float, lr: float, biases: bool) -> None:
    """One SGD pass over ``block`` visiting sub-blocks in ``order``; updates both sides in place."""
    _sgd(block.rows, block.cols, block.vals, block.offsets, order.astype(np.int64), rows.vecs, cols.vecs,
         rows.bias, cols.bias, rows.reg, cols.reg, rows.bias_reg, cols.bias_reg, np.float32(mu), np.float32(lr), biases)


def sgd_block_numpy(block: RatingBlock, order: np.ndarray, rows: Side, cols: Side, *, mu: float, lr: float, biases: bool) -> None:
    """The reference of :func:`sgd_block` in plain numpy (slow; for tests)."""
    mu, lr = np.float32(mu), np.float32(lr)
    P, Q, bp, bq = rows.vecs, cols.vecs, rows.bias, cols.bias
    for s in order:
        for n in range(block.offsets[s], block.offsets[s + 1]):
            u, i = block.rows[n], block.cols[n]
            e = block.vals[n] - (mu + bp[u] + bq[i] + np.dot(P[u], Q[i]))
            if biases:
                bp[u] += lr * (e - rows.bias_reg[u] * bp[u])
                bq[i] += lr * (e - cols.bias_reg[i] * bq[i])
            pu = P[u].copy()
            P[u] += lr * (e * Q[i] - rows.reg[u] * pu)
            Q[i] += lr * (e * pu - cols.reg[i] * Q[i])


@njit(nogil=True, cache=True, fastmath=True)
def _penalties(X, b, reg, bias_reg):  # pragma: no cover - compiled
    out = np.empty(X.shape[0])
    for r in range(X.shape[0]):
        acc = 0.0
        for f in range(X.shape[1]):
            acc += X[r, f] * X[r, f]
        out[r] = reg[r] * acc + bias_reg[r] * b[r] * b[r]
    return out


@njit(nogil=True, cache=True, fastmath=True)
def _evaluate(rows, cols, vals, P, Q, bp, bq, rp, rq, rbp, rbq, mu, lo, hi):  # pragma: no cover - compiled
    p_norm = _penalties(P, bp, rp, rbp)
    q_norm = _penalties(Q, bq, rq, rbq)
    sse = 0.0
    sse_clipped = 0.0
    penalty = 0.0
    for n in range(vals.shape[0]):
        u = rows[n]
        i = cols[n]
        pred = _predict(P, Q, bp, bq, u, i, mu)
        e = vals[n] - pred
        sse += e * e
        c = vals[n] - min(max(pred, lo), hi)
        sse_clipped += c * c
        penalty += p_norm[u] + q_norm[i]
    return sse, sse_clipped, penalty


class BlockErrors(NamedTuple):
    """Sums over one block's ratings: raw and clipped squared errors, the L2 penalty, the count."""

    sse: float
    sse_clipped: float
    penalty: float
    count: int


def evaluate_block(block: RatingBlock, rows: Side, cols: Side, *, mu: float, rating_range: list[float]) -> BlockErrors:
    """Squared errors (predictions raw, and clipped to ``rating_range``) and the penalty sum of a block."""
    lo, hi = rating_range
    sse, sse_clipped, penalty = _evaluate(
        block.rows, block.cols, block.vals, rows.vecs, cols.vecs, rows.bias, cols.bias,
        rows.reg, cols.reg, rows.bias_reg, cols.bias_reg, np.float32(mu), np.float32(lo), np.float32(hi),
    )
    return BlockErrors(float(sse), float(sse_clipped), float(penalty), len(block.vals))
