"""The DSGD block kernel alone: rating updates per second on one core, at rank 32 and 128.

    python bench/kernel.py [--rows 100000 --cols 10000 --ratings 2000000 --ranks 32 128]

The default block is what one task gets at d = 2 from the default synthetic set of
bench/dsgd_vs_als.py (200k users x 20k items, 10M ratings): 100k rows x 10k columns
and about 2M ratings, placed uniformly at random (no popularity skew to help the
caches). ``--parquet DIR`` takes the block instead from a ratings set of bench/job.py
(``DIR`` its train folder: user_id, item_id, rating), the ratings with even user and item
ids, as one task of a d = 2 fit gets them. Three layouts of the same ratings are timed on the
same arrays:

- ``laid out``: what the trainer runs, :func:`mfdist.train.dsgd.kernel.layout_block`
  (sub-blocks of about SUB_BLOCK_RATINGS ratings, by row inside each, read sequentially);
- ``1024 x 1024``: the same with sub-blocks of a fixed 1024 rows by 1024 columns (the layout
  before the sub-block size followed the block's density);
- ``one shuffle``: the same ratings in one random order with a single sub-block,
  the naive layout, as the baseline.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mfdist.train.dsgd.kernel import RatingBlock, Side, layout_block, penalty_weights, sgd_block  # noqa: E402


def _side(rng: np.random.Generator, counts: np.ndarray, rank: int) -> Side:
    reg, bias_reg = penalty_weights(counts, reg=0.05, bias_reg=1.0, exponent=0.6, mean_count=float(counts.mean()))
    vecs = (rng.standard_normal((len(counts), rank)) * 0.1).astype(np.float32)
    return Side(vecs, np.zeros(len(counts), np.float32), reg, bias_reg, np.ones(len(counts), np.float32))


def updates_per_second(block: RatingBlock, n_rows: int, n_cols: int, rank: int, passes: int) -> float:
    """Best of ``passes`` timed passes (after one untimed pass that compiles and warms the caches)."""
    rng = np.random.default_rng(0)
    rows = _side(rng, np.bincount(block.rows, minlength=n_rows), rank)
    cols = _side(rng, np.bincount(block.cols, minlength=n_cols), rank)
    best = float("inf")
    for p in range(passes + 1):
        order = rng.permutation(block.n_sub)
        started = time.perf_counter()
        sgd_block(block, order, rows, cols, mu=3.5, lr=0.002, biases=True, rating_range=(1.0, 5.0))
        if p:
            best = min(best, time.perf_counter() - started)
    return len(block.vals) / best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--cols", type=int, default=10_000)
    parser.add_argument("--ratings", type=int, default=2_000_000)
    parser.add_argument("--ranks", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--parquet", help="a bench/job.py train folder to take a d = 2 block from, instead of uniform ratings")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(1)
    rows, cols, vals = _block_of(args.parquet) if args.parquet else _uniform(rng, args.rows, args.cols, args.ratings)
    n_rows, n_cols = int(rows.max()) + 1, int(cols.max()) + 1
    shuffled = rng.permutation(len(vals))
    naive = RatingBlock(rows[shuffled], cols[shuffled], vals[shuffled], np.array([0, len(vals)], np.int64))
    print(f"block: {n_rows} rows x {n_cols} columns, {len(vals)} ratings; one core (numba, nogil); the kernel alone")
    print(f"{'rank':>5} {'layout':>12} {'M updates/s':>12} {'vs one shuffle':>15}")
    for rank in args.ranks:
        base = updates_per_second(naive, n_rows, n_cols, rank, args.passes)
        print(f"{rank:>5} {'one shuffle':>12} {base / 1e6:>12.1f} {1.0:>14.2f}x")
        for name, side in (("1024 x 1024", 1024), ("laid out", None)):
            block = layout_block(rows, cols, vals, rank=rank, seed=7, side=side)
            fast = updates_per_second(block, n_rows, n_cols, rank, args.passes)
            print(f"{rank:>5} {name:>12} {fast / 1e6:>12.1f} {fast / base:>14.2f}x  ({block.n_sub} sub-blocks)")


def _uniform(rng: np.random.Generator, n_rows: int, n_cols: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """About ``n`` distinct cells of an ``n_rows`` x ``n_cols`` block, uniformly placed, with ratings 1-5."""
    cells = np.unique(rng.integers(0, n_rows * n_cols, size=n, dtype=np.int64))
    return (cells // n_cols).astype(np.int32), (cells % n_cols).astype(np.int32), rng.integers(1, 6, size=len(cells)).astype(np.float32)


def _block_of(folder: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ratings of a bench set with even user and item ids, as local (row, column) indices of a d = 2 block."""
    table = pq.read_table(folder, columns=["user_id", "item_id", "rating"])
    users, items = (table.column(c).to_numpy().astype(np.int64) for c in ("user_id", "item_id"))
    keep = (users % 2 == 0) & (items % 2 == 0)
    return (users[keep] // 2).astype(np.int32), (items[keep] // 2).astype(np.int32), table.column("rating").to_numpy()[keep].astype(np.float32)


if __name__ == "__main__":
    main()
