"""The DSGD block kernel alone: rating updates per second on one core, at rank 32 and 128.

    python bench/kernel.py [--rows 100000 --cols 10000 --ratings 2000000 --ranks 32 128]

The default block is what one task gets at d = 2 from the default synthetic set of
bench/dsgd_vs_als.py (200k users x 20k items, 10M ratings): 100k rows x 10k columns
and about 2M ratings, placed uniformly at random (no popularity skew to help the
caches). Two layouts of the same ratings are timed on the same arrays:

- ``laid out``: what the trainer runs, :func:`mfdist.train.dsgd.kernel.layout_block`
  (sub-blocks sized for the cache, shuffled inside each, read sequentially);
- ``one shuffle``: the same ratings in one random order with a single sub-block,
  the naive layout, as the baseline.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

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
    args = parser.parse_args(argv)

    rng = np.random.default_rng(1)
    cells = np.unique(rng.integers(0, args.rows * args.cols, size=args.ratings, dtype=np.int64))
    rows, cols = (cells // args.cols).astype(np.int32), (cells % args.cols).astype(np.int32)
    vals = rng.integers(1, 6, size=len(cells)).astype(np.float32)
    shuffled = rng.permutation(len(cells))
    naive = RatingBlock(rows[shuffled], cols[shuffled], vals[shuffled], np.array([0, len(cells)], np.int64))
    print(f"block: {args.rows} rows x {args.cols} columns, {len(cells)} ratings; one core (numba, nogil)")
    print(f"{'rank':>5} {'layout':>12} {'M updates/s':>12} {'vs one shuffle':>15}")
    for rank in args.ranks:
        laid_out = layout_block(rows, cols, vals, rank=rank, seed=7)
        base = updates_per_second(naive, args.rows, args.cols, rank, args.passes)
        fast = updates_per_second(laid_out, args.rows, args.cols, rank, args.passes)
        print(f"{rank:>5} {'one shuffle':>12} {base / 1e6:>12.1f} {1.0:>14.2f}x")
        print(f"{rank:>5} {'laid out':>12} {fast / 1e6:>12.1f} {fast / base:>14.2f}x  ({laid_out.n_sub} sub-blocks)")


if __name__ == "__main__":
    main()
