"""Scaling of the DSGD trainer: epoch time and peak memory of the driver and of a task against the number
of ratings, and against the number of blocks d.

    python bench/scale.py [--ratings 1000000 5000000 20000000] [--epochs 3] [--rank 32]
                          [--master local[2]] [--driver-memory 12g]
    python bench/scale.py --ratings 5000000 --blocks 2 8 32 64      # the d sweep

For each size N in ``--ratings``, planted ratings from :mod:`mfdist.synth` are
drawn (N draws, repeated pairs dropped) over N / ``--ratings-per-user`` users
(default 50) and N / ``--ratings-per-item`` items (default 500), so users and
items grow with the ratings; ids are used as indices. A first child process
generates them and writes them to parquet; a second child process (a Spark
application of its own, same master and driver memory) reads them back, caches
and counts them, then runs mfdist's DSGD trainer (``train.algorithm=dsgd``,
rank ``--rank``, ``--epochs`` epochs, no test set) on them. Only this second
child's memory is reported, so each size's peaks are its own and exclude data
generation.

Measured per size, from the trainer's EpochRecord callback: the one-off layout
seconds (from the start of the fit to the start of the first epoch: summary,
block layout and the initial checkpoint) and the median epoch seconds over all
epochs (a rolled-back epoch included; an epoch is its sub-epochs, the
evaluation pass over all training ratings and the checkpoint). Memory: this
process samples ``/proc/<pid>/statm`` of the fit child's whole process tree
every 0.1 s and classifies each process by ``/proc/<pid>/cmdline``: the driver
side is the Python driver and the JVM (driver and executor in one in local
mode) and anything else not a Python worker, reported as the peak of their
summed RSS; the task side is the Python worker processes (``pyspark.daemon``
and the workers forked from it, which run the block kernel), reported as the
largest RSS of any single one of them. Finally the growth exponent of the
median epoch time against the ratings is fitted by least squares on log-log;
goal: it must stay near 1 (linear in the ratings).

With ``--blocks``, every size is fitted once per d (``train.blocks``) and the
median epoch of each d is printed as a ratio to that of the first d. On a
cluster d is the number of task slots (tens to thousands); here, on 2 cores,
d > 2 means d² blocks per epoch for 2 task slots, so the sweep shows what a
larger grid costs by itself. Goal: the epoch at d = 32 within 2x of d = 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pyspark.sql import DataFrame, SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from mfdist import schema as S  # noqa: E402
from harness import bench_session, rss_kb, run_child, tree  # noqa: E402
from mfdist.config import Config, load_config  # noqa: E402
from mfdist.session import task_slots  # noqa: E402
from mfdist.synth import generate_ratings  # noqa: E402
from mfdist.train import EpochRecord, make_trainer  # noqa: E402

PHASES = ("data", "fit")
WORKER_MARKS = (b"pyspark.daemon", b"pyspark.worker")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratings", type=int, nargs="+", default=[1_000_000, 5_000_000, 20_000_000], help="synthetic ratings drawn per size")
    p.add_argument("--ratings-per-user", type=int, default=50, help="users = ratings / this")
    p.add_argument("--ratings-per-item", type=int, default=500, help="items = ratings / this")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--blocks", type=int, nargs="+", default=None, help="a d sweep: fit each size with train.blocks = each of these")
    p.add_argument("--master", default="local[2]")
    p.add_argument("--driver-memory", default="12g")
    p.add_argument("--work", default=None, help="scratch folder (default: a new temporary folder)")
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--d", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------- memory sampling from /proc


def _is_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return any(mark in cmdline for mark in WORKER_MARKS)


def tree_rss_kb(root: int) -> tuple[int, int]:
    """(summed RSS of the driver side, largest RSS of one Python worker) over ``root`` and every process under it."""
    driver, worker = 0, 0
    for pid in tree(root):
        rss = rss_kb(pid)
        if _is_worker(pid):
            worker = max(worker, rss)
        else:
            driver += rss
    return driver, worker


def spawn_phase(args: argparse.Namespace, phase: str, size: int, d: int | None = None) -> tuple[dict, float, float]:
    """Run ``phase`` for ``size`` (and ``d`` blocks) in a child process; its JSON result line and the peak driver and worker RSS (GB)."""
    argv = [sys.executable, __file__, "--phase", phase, "--size", str(size), "--work", args.work] + (["--d", str(d)] if d else []) + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("phase", "size", "work", "ratings", "blocks", "d")
    ]
    out, (driver_gb, worker_gb) = run_child(argv, tree_rss_kb, f"phase {phase} at {size} ratings")
    return out, driver_gb, worker_gb


# ---------------------------------------------------------------- the phases (each in its own Spark application)


def session(args: argparse.Namespace) -> SparkSession:
    return bench_session(master=args.master, driver_memory=args.driver_memory, work=args.work,
                         app=f"bench-scale-{args.phase}-{args.size}")


def shape(args: argparse.Namespace, size: int) -> tuple[int, int]:
    """(users, items) of a size."""
    return max(1, size // args.ratings_per_user), max(1, size // args.ratings_per_item)


def config(args: argparse.Namespace, size: int) -> Config:
    users, items = shape(args, size)
    return load_config(None, [
        f"run.checkpoint_dir={args.work}/ck", f"run.run_id=scale-{size}", "input.format=synthetic",
        f"input.synthetic.users={users}", f"input.synthetic.items={items}", f"input.synthetic.ratings={size}",
        "train.algorithm=dsgd", f"train.rank={args.rank}", f"train.epochs={args.epochs}",
        *([f"train.blocks={args.d}", f"run.run_id=scale-{size}-d{args.d}"] if args.d else []),
    ])


def indexed(df: DataFrame) -> DataFrame:
    return df.select(
        F.col(S.USER_ID).cast("int").alias(S.USER_IDX), F.col(S.ITEM_ID).cast("int").alias(S.ITEM_IDX),
        F.col(S.RATING).cast("double").alias(S.RATING),
    )


def run_phase(args: argparse.Namespace) -> dict:
    cfg = config(args, args.size)
    path = f"{args.work}/ratings-{args.size}"
    spark = session(args)
    try:
        if args.phase == "data":
            started = time.perf_counter()
            indexed(generate_ratings(spark, cfg=cfg.input.synthetic, rating_range=cfg.input.rating_range)).write.mode("overwrite").parquet(path)
            return {"seconds": time.perf_counter() - started}
        train = spark.read.parquet(path).cache()
        n = train.count()
        records: list[tuple[EpochRecord, float]] = []
        started = time.perf_counter()
        make_trainer(cfg).fit(train, callback=lambda r: records.append((r, time.perf_counter() - started)))
        fit_s = time.perf_counter() - started
        first, elapsed = records[0]
        return {
            "n": n, "layout_s": elapsed - first.seconds, "epoch_s": [r.seconds for r, _ in records], "fit_s": fit_s,
            "d": cfg.train.blocks or task_slots(spark),
        }
    finally:
        spark.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.phase:
        print(json.dumps(run_phase(args)))
        return 0
    args.work = args.work or tempfile.mkdtemp(prefix="bench-scale-")
    print(f"dsgd scaling: rank {args.rank}, {args.epochs} epochs; {args.master} on {os.cpu_count()} CPU cores, "
          f"driver memory {args.driver_memory}; users = ratings / {args.ratings_per_user}, items = ratings / {args.ratings_per_item}; "
          f"scratch {args.work}", flush=True)
    header = (f"{'ratings':>11} {'users':>8} {'items':>7} {'d':>4} {'layout s':>9} {'median epoch s':>15} {'epochs s':>22} "
              f"{'driver peak GB':>15} {'worker peak GB':>15}")
    print(header)
    rows = []
    for size in args.ratings:
        gen, _, _ = spawn_phase(args, "data", size)
        users, items = shape(args, size)
        medians = []
        for d in args.blocks or [None]:
            out, driver_gb, worker_gb = spawn_phase(args, "fit", size, d)
            median = float(np.median(out["epoch_s"]))
            medians.append((out["d"], median))
            ratio = f"   x{median / medians[0][1]:.2f} of d = {medians[0][0]}" if args.blocks else ""
            print(f"{out['n']:>11,} {users:>8,} {items:>7,} {out['d']:>4} {out['layout_s']:>9.1f} {median:>15.2f} "
                  f"{' '.join(f'{s:.1f}' for s in out['epoch_s']):>22} {driver_gb:>15.2f} {worker_gb:>15.2f}"
                  f"   (generated in {gen['seconds']:.0f} s){ratio}", flush=True)
        rows.append((out["n"], medians[0][1]))
    if len(rows) >= 2:
        n, t = np.array(rows).T  # at the first d of a sweep
        exponent = np.polyfit(np.log(n), np.log(t), 1)[0]
        print(f"growth exponent of the median epoch time vs ratings (least squares on log-log, {len(rows)} sizes): "
              f"{exponent:.3f} (goal: must stay near 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
