"""The DSGD block kernel: SGD over one block's ratings, compiled with numba (nogil).

A block is laid out once as columnar arrays (``rows``, ``cols`` local row
indices, ``vals`` ratings) sorted into *sub-blocks* of at most
``sub_block_side`` rows by as many columns (about
``SUB_BLOCK_RATINGS`` ratings each), by row inside each sub-block with
each row's ratings in a seeded random order. A pass walks the sub-blocks in
a random order and each sub-block's ratings sequentially, so the factor rows
it touches stay in cache and the rating arrays are read as a stream (LIBMF's layout; reading the same ratings
through a random index array is several times slower).

Model and update for one rating ``r`` of row ``u`` and column ``i``
(``lr`` the step size of the epoch; ``rp``, ``rq`` the per-row factor penalties
and ``rbp``, ``rbq`` the per-row bias penalties, see :func:`penalty_weights`;
``gp``, ``gq`` each row's sum of mean squared factor gradients, 1 at the start)::

    e   = r - (mu + bp[u] + bq[i] + P[u] . Q[i])
    lu  = lr / sqrt(gp[u]),  li = lr / sqrt(gq[i])
    bp[u] += lu * (e - rbp[u] * bp[u])           (only when biases are on)
    bq[i] += li * (e - rbq[i] * bq[i])
    dp = e * Q[i] - rp[u] * P[u],  dq = e * P[u] - rq[i] * Q[i]     (old P[u], Q[i])
    P[u] += lu * dp,  Q[i] += li * dq
    gp[u] += |dp|^2 / rank,  gq[i] += |dq|^2 / rank

which is SGD on the objective (sums over the ratings)::

    sum (r - r_hat)^2 + sum (rp[u] |P[u]|^2 + rbp[u] bp[u]^2 + rq[i] |Q[i]|^2 + rbq[i] bq[i]^2)

A pass also returns that objective's terms as it meets them (each rating's error
and penalty just before its update, LIBMF's and Vowpal Wabbit's progressive
loss): the epoch's training loss costs no second pass over the ratings.

with LIBMF's per-row AdaGrad steps (Chin et al., PAKDD 2015): a row's step
shrinks with the gradients it has seen, so frequent rows settle while rare rows
still move, and a large ``lr`` is safe from the first epoch. On the synthetic
benchmark this reaches ALS's test RMSE in 6 epochs instead of 14 with one global
step (the bold driver still scales ``lr`` per epoch).

:func:`sgd_block_numpy` is the same pass in plain numpy, the reference for tests.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, NamedTuple

import numpy as np
from numba import njit


log = logging.getLogger(__name__)


def compiled(**options) -> Callable:
    """``numba.njit(nogil, fastmath, **options)`` with numba's on-disk cache when it has somewhere to write.

    numba refuses ``cache=True`` (at import) where it finds no writable cache folder: a package
    in a read-only site-packages or a zip on ``--py-files`` on an executor whose home is not
    writable. There the kernels are compiled once per Python worker instead.
    """
    def wrap(fn: Callable) -> Callable:
        try:
            return njit(nogil=True, fastmath=True, cache=True, **options)(fn)
        except RuntimeError as exc:  # numba: "cannot cache function ...: no locator available"
            if "cannot cache" not in str(exc):
                raise
            log.info("numba: no writable cache for %s; compiling it in each worker", fn.__name__)
            return njit(nogil=True, fastmath=True, cache=False, **options)(fn)
    return wrap

# A sub-block holds about SUB_BLOCK_RATINGS ratings (its side follows the block's density), and
# fewer where one side's factor rows would pass SUB_BLOCK_BYTES: each factor row it loads then
# serves several ratings from the cache. A fixed 1024 x 1024 held 840 ratings at 20M ratings
# (500k x 50k), so nearly every rating missed the cache twice. bench/kernel.py, M updates/s on one
# core, fixed 1024 x 1024 -> this: uniform 2M (100k x 10k) 26.1 -> 37.6-39.5 at rank 32, 8.4 ->
# 16.1 at rank 128; with --parquet on the 20M set's d = 2 block 17.3 -> 27.7 and 6.5 -> 14.2.
# A scan of 5k, 10k, 20k and 40k ratings per sub-block on those blocks and the 5M set's: 20k was
# best or tied at both ranks. (Figures from before the row order inside sub-blocks; see layout_block.)
SUB_BLOCK_RATINGS = 20_000
SUB_BLOCK_BYTES = 4 << 20
MIN_SUB_BLOCK_SIDE = 16


class RatingBlock(NamedTuple):
    """One block's ratings in pass order: sub-block ``s`` is ``[offsets[s], offsets[s + 1])``."""

    rows: np.ndarray  # int32 local row index
    cols: np.ndarray  # int32 local column index
    vals: np.ndarray  # float32 rating
    offsets: np.ndarray  # int64, len = sub-blocks + 1

    @property
    def n_sub(self) -> int:
        return len(self.offsets) - 1


def sub_block_side(rank: int, *, rows: int, cols: int, ratings: int) -> int:
    """Rows (and columns) per sub-block of a ``rows`` x ``cols`` block of ``ratings`` ratings (see SUB_BLOCK_RATINGS)."""
    dense = math.sqrt(SUB_BLOCK_RATINGS * rows * cols / max(ratings, 1))
    return max(MIN_SUB_BLOCK_SIDE, min(int(dense), SUB_BLOCK_BYTES // (4 * rank)))


def block_side(rows: np.ndarray, cols: np.ndarray, *, rank: int) -> int:
    """The sub-block side of a block with these (local) row and column indices."""
    extent = (int(rows.max()) + 1, int(cols.max()) + 1) if len(rows) else (1, 1)
    return sub_block_side(rank, rows=extent[0], cols=extent[1], ratings=len(rows))


def layout_block(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, *, rank: int, seed: int,
                 side: int | None = None) -> RatingBlock:
    """Sort a block's (distinct) ratings into sub-blocks (``side`` rows by as many columns; by default
    :func:`block_side`'s), by row inside each one and a row's ratings in a seeded random order."""
    rows = np.asarray(rows, dtype=np.int32)
    cols = np.asarray(cols, dtype=np.int32)
    side = side or block_side(rows, cols, rank=rank)
    n_sub_cols = int(cols.max()) // side + 1 if len(cols) else 1
    order, offsets = _layout_order(rows, cols, np.int64(side), np.int64(n_sub_cols), np.uint64(seed))
    return RatingBlock(rows[order], cols[order], np.asarray(vals, dtype=np.float32)[order], offsets)


@compiled()
def _splitmix64(x):  # pragma: no cover - compiled
    """mfdist.hashing.splitmix64 of one uint64 (uint64 arithmetic throughout: numba turns int64 with uint64 into float)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@compiled()
def _layout_order(rows, cols, side, n_sub_cols, seed):  # pragma: no cover - compiled
    """The pass order, by sub-block, row and then splitmix64 of (row, col, seed), and the sub-blocks' offsets.

    A hash of (row, col) rather than of the position: the layout does not depend on input order, and
    as splitmix64 is a bijection a row's ratings have distinct keys. A row's ratings come one after
    another so its factor row stays in L1 (LIBMF sorts its blocks' ratings the same way; the kernel on
    the 20M set's block, bench/kernel.py --parquet, rank 32: 27.7 -> 52.7M updates/s). A counting sort
    by row, each row by key, then a counting sort by column band within each band of ``side`` rows;
    keys and columns move with the indices so that every pass reads them in order (layout_block on
    that block: 1.2-1.8 s with numpy's argsorts, 0.4 s with this).
    """
    n = len(rows)
    n_rows = np.int64(rows.max()) + 1 if n else np.int64(0)
    row_start = np.zeros(n_rows + 1, np.int64)
    for j in range(n):
        row_start[rows[j] + 1] += 1
    row_start = np.cumsum(row_start)
    fill = row_start[:-1].copy()
    idx = np.empty(n, np.int64)
    key = np.empty(n, np.uint64)
    col = np.empty(n, np.int32)
    for j in range(n):
        a = fill[rows[j]]
        fill[rows[j]] += 1
        idx[a] = j
        col[a] = cols[j]
        key[a] = _splitmix64(((np.uint64(rows[j]) << np.uint64(32)) | np.uint64(cols[j])) ^ seed)
    for r in range(n_rows):
        lo, hi = row_start[r], row_start[r + 1]
        if hi - lo > 32:
            by_key = np.argsort(key[lo:hi])
            idx[lo:hi] = idx[lo:hi][by_key]
            col[lo:hi] = col[lo:hi][by_key]
        else:  # insertion sort: most rows have a few ratings in a block
            for a in range(lo + 1, hi):
                j, k, c = idx[a], key[a], col[a]
                b = a
                while b > lo and key[b - 1] > k:
                    idx[b], key[b], col[b] = idx[b - 1], key[b - 1], col[b - 1]
                    b -= 1
                idx[b], key[b], col[b] = j, k, c
    order = np.empty(n, np.int64)
    offsets = np.zeros(n + 1, np.int64)
    n_sub = 0
    count = np.empty(n_sub_cols + 1, np.int64)
    for band in range(0, n_rows, side):
        lo, hi = row_start[band], row_start[min(band + side, n_rows)]
        count[:] = 0
        for a in range(lo, hi):
            count[col[a] // side + 1] += 1
        for c in range(n_sub_cols):
            if count[c + 1]:
                n_sub += 1
                offsets[n_sub] = lo + count[c] + count[c + 1]
            count[c + 1] += count[c]
        for a in range(lo, hi):
            c = col[a] // side
            order[lo + count[c]] = idx[a]
            count[c] += 1
    return order, offsets[:n_sub + 1].copy()


class Side(NamedTuple):
    """One side's factor rows touched by a block, with their per-row penalty weights and step state."""

    vecs: np.ndarray  # float32 (n, rank)
    bias: np.ndarray  # float32 (n,)
    reg: np.ndarray  # float32 (n,) factor penalty per rating
    bias_reg: np.ndarray  # float32 (n,) bias penalty per rating
    grad_sq: np.ndarray  # float32 (n,) sum of mean squared factor gradients (AdaGrad), starts at 1


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


# error_model="numpy": a diverging pass (the bold driver's case) yields inf/NaN, not an exception.
@compiled(error_model="numpy")
def _sgd(rows, cols, vals, offsets, order, P, Q, bp, bq, rp, rq, rbp, rbq, gp, gq, mu, lr, biases, lo, hi):  # pragma: no cover - compiled
    k = P.shape[1]
    inv_k = np.float32(1.0 / k)
    sse = 0.0
    sse_clipped = 0.0
    penalty = 0.0
    for s in order:
        for n in range(offsets[s], offsets[s + 1]):
            u = rows[n]
            i = cols[n]
            # Row views: the loops below then index one contiguous vector each.
            p = P[u]
            q = Q[i]
            dot = np.float32(0.0)
            for f in range(k):
                dot += p[f] * q[f]
            pred = mu + bp[u] + bq[i] + dot
            e = vals[n] - pred
            c = vals[n] - min(max(pred, lo), hi)
            sse += e * e
            sse_clipped += c * c
            lu = lr / np.sqrt(gp[u])
            li = lr / np.sqrt(gq[i])
            ru = rp[u]
            ri = rq[i]
            pen_b = rbp[u] * bp[u] * bp[u] + rbq[i] * bq[i] * bq[i]
            if biases:
                bp[u] += lu * (e - rbp[u] * bp[u])
                bq[i] += li * (e - rbq[i] * bq[i])
            su = np.float32(0.0)
            si = np.float32(0.0)
            nu = np.float32(0.0)
            ni = np.float32(0.0)
            for f in range(k):
                pu = p[f]
                qi = q[f]
                nu += pu * pu
                ni += qi * qi
                dp = e * qi - ru * pu
                dq = e * pu - ri * qi
                p[f] = pu + lu * dp
                q[f] = qi + li * dq
                su += dp * dp
                si += dq * dq
            gp[u] += su * inv_k
            gq[i] += si * inv_k
            penalty += pen_b + ru * nu + ri * ni
    return sse, sse_clipped, penalty


class BlockErrors(NamedTuple):
    """Sums over ratings: raw and clipped squared errors, the L2 penalty, the count."""

    sse: float
    sse_clipped: float
    penalty: float
    count: int

    def plus(self, other: "BlockErrors") -> "BlockErrors":
        return BlockErrors(*(a + b for a, b in zip(self, other)))


NO_ERRORS = BlockErrors(0.0, 0.0, 0.0, 0)


def sgd_block(block: RatingBlock, order: np.ndarray, rows: Side, cols: Side, *, mu: float, lr: float, biases: bool,
              rating_range: tuple[float, float]) -> BlockErrors:
    """One SGD pass over ``block`` visiting sub-blocks in ``order``; updates both sides in place.

    Returns the objective's terms met on the way (predictions clipped to ``rating_range`` for
    ``sse_clipped``), each taken just before its rating's update.
    """
    lo, hi = rating_range
    sse, sse_clipped, penalty = _sgd(
        block.rows, block.cols, block.vals, block.offsets, order.astype(np.int64), rows.vecs, cols.vecs,
        rows.bias, cols.bias, rows.reg, cols.reg, rows.bias_reg, cols.bias_reg, rows.grad_sq, cols.grad_sq,
        np.float32(mu), np.float32(lr), biases, np.float32(lo), np.float32(hi),
    )
    return BlockErrors(float(sse), float(sse_clipped), float(penalty), len(block.vals))


@compiled()
def _sample_sse(held, moving, ratings, held_idx, held_bias, held_vecs, moving_idx, moving_bias, moving_vecs, mu, lo, hi):  # pragma: no cover - compiled
    hp = np.searchsorted(held_idx, held)
    mp = np.searchsorted(moving_idx, moving)
    sse = 0.0
    for n in range(len(ratings)):
        p = held_vecs[hp[n]]
        q = moving_vecs[mp[n]]
        dot = 0.0
        for f in range(p.shape[0]):
            dot += np.float64(p[f]) * q[f]
        pred = mu + held_bias[hp[n]] + moving_bias[mp[n]] + dot
        c = ratings[n] - min(max(pred, lo), hi)
        sse += c * c
    return sse


SideRows = tuple[np.ndarray, np.ndarray, np.ndarray]  # one side's (idx ascending, bias, vecs)


def sample_sse(held: np.ndarray, moving: np.ndarray, ratings: np.ndarray, held_rows: SideRows, moving_rows: SideRows, *, mu: float,
               rating_range: tuple[float, float]) -> float:
    """Squared error of the clipped predictions for the pairs (held[n], moving[n]) from each side's rows.

    One pass without the (pairs, rank) gathers numpy needs: 100k pairs at rank 50 in ~2 ms instead of ~70.
    """
    lo, hi = rating_range
    return float(_sample_sse(held, moving, ratings, *held_rows, *moving_rows, float(mu), float(lo), float(hi)))


def warm_up() -> None:
    """Load the compiled pass (numba's cache, else a compile) by one update on a one-rating block.

    The argument types are the trainer's, so the dispatcher holds the very specialisation the
    epochs call.
    """
    one = np.zeros(1, np.int32)
    block = layout_block(one, one, np.ones(1, np.float32), rank=1, seed=0)
    side = Side(np.zeros((1, 1), np.float32), np.zeros(1, np.float32), np.zeros(1, np.float32), np.zeros(1, np.float32),
                np.ones(1, np.float32))
    sgd_block(block, np.zeros(1, np.int64), side, side._replace(vecs=side.vecs.copy()), mu=0.0, lr=0.1, biases=True,
              rating_range=(0.0, 1.0))


def sgd_block_numpy(block: RatingBlock, order: np.ndarray, rows: Side, cols: Side, *, mu: float, lr: float, biases: bool,
                    rating_range: tuple[float, float]) -> BlockErrors:
    """The reference of :func:`sgd_block` in plain numpy (slow; for tests)."""
    mu, lr = np.float32(mu), np.float32(lr)
    P, Q, bp, bq = rows.vecs, cols.vecs, rows.bias, cols.bias
    sums = np.zeros(3)
    for s in order:
        for n in range(block.offsets[s], block.offsets[s + 1]):
            u, i = block.rows[n], block.cols[n]
            pred = mu + bp[u] + bq[i] + np.dot(P[u], Q[i])
            e = block.vals[n] - pred
            sums += [
                e * e, (block.vals[n] - np.clip(pred, *rating_range)) ** 2,
                rows.reg[u] * P[u] @ P[u] + rows.bias_reg[u] * bp[u] ** 2 + cols.reg[i] * Q[i] @ Q[i] + cols.bias_reg[i] * bq[i] ** 2,
            ]
            lu, li = lr / np.sqrt(rows.grad_sq[u]), lr / np.sqrt(cols.grad_sq[i])
            if biases:
                bp[u] += lu * (e - rows.bias_reg[u] * bp[u])
                bq[i] += li * (e - cols.bias_reg[i] * bq[i])
            dp = e * Q[i] - rows.reg[u] * P[u]
            dq = e * P[u] - cols.reg[i] * Q[i]
            P[u] += lu * dp
            Q[i] += li * dq
            rows.grad_sq[u] += np.mean(dp * dp)
            cols.grad_sq[i] += np.mean(dq * dq)
    return BlockErrors(float(sums[0]), float(sums[1]), float(sums[2]), len(block.vals))
