"""Benchmark of the DSGD trainer against ALS: per-epoch seconds, training loss and test RMSE, and time to ALS's accuracy.

    python bench/dsgd_vs_als.py [--datasets synthetic ml100k] [--ratings 10000000 --users 200000 --items 20000]
                                [--rank 32] [--als-iterations 10] [--als-curve 1 2 5] [--dsgd-epochs 30] [--master local[2]]

Both trainers run in one Spark application (``--master``, default local[2];
``--driver-memory``, default 12g) on the same cached splits, after untimed
warm-up fits of both on a 1% sample (so neither pays the JVM's and the Python
workers' start-up for the other):

- ``synthetic``: planted ratings from :mod:`mfdist.synth` (``--ratings``,
  ``--users``, ``--items``; planted rank ``--planted-rank``, noise ``--noise``),
  ids used as indices, split 80/20 at random (:func:`mfdist.split.random_split`),
  written to parquet under the work folder and read back into cached DataFrames
  before anything is timed. ALS is mfdist's ALS trainer (MLlib ALS on the
  residuals of a bias model, one bias round, ``--als-iterations`` iterations,
  reg ``--als-reg``); DSGD runs ``--dsgd-epochs`` epochs with reg ``--dsgd-reg``
  and initial step ``--dsgd-step``. Both at rank ``--rank``.
- ``ml100k``: MovieLens 100k u1..u5 (when ``../shared/data/ml-100k`` exists), ids
  minus 1 as indices; ALS with ``conf/local.yaml``'s ``train.als`` settings and DSGD with
  ``conf/ml100k-dsgd.yaml``'s (both rank 50), 5-fold means at the end.

Printed per DSGD epoch: wall seconds of the epoch (sub-epochs, checkpoint and
the test RMSE), seconds since the fit started (the one-off layout included),
the training objective (squared errors plus penalties, per rating, summed by the
kernel as it passes each rating) and training RMSE (the same progressive
figure), the test RMSE on ``--eval-sample`` test ratings (``train.eval_sample``;
default: all of them, so the figure is exact) and the step size; a
rolled-back epoch (bold driver) is marked and never counts as reaching a
target. MLlib runs all ALS iterations inside one fit, so ALS prints one row per
fit: total fit seconds (bias model, iterations, and the train and test RMSE
passes, as for DSGD) and seconds per iteration; ``--als-curve 1 2 5`` first fits
ALS with those iteration counts too (a fit each, not counted in the ratio), for
its test RMSE per iteration count. The ratio is (DSGD wall time from the
start of its fit to the end of the first kept epoch whose test RMSE is at or
below ALS's final test RMSE) / (ALS's fit time); goal on the synthetic set <= 0.2.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pyspark.sql import DataFrame, SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from mfdist import schema as S  # noqa: E402
from harness import bench_session  # noqa: E402
from mfdist.config import Config, load_config  # noqa: E402
from mfdist.ingest import read_movielens  # noqa: E402
from mfdist.session import release_cached, task_slots  # noqa: E402
from mfdist.split import random_split  # noqa: E402
from mfdist.synth import generate_ratings  # noqa: E402
from mfdist.train import EpochRecord, make_trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ML100K = (REPO / ".." / "shared" / "data" / "ml-100k").resolve()
RATIO_GOAL = 0.2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", choices=["synthetic", "ml100k"], default=["synthetic", "ml100k"])
    p.add_argument("--ratings", type=int, default=10_000_000, help="synthetic ratings drawn (repeated pairs are dropped)")
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--planted-rank", type=int, default=32, help="rank of the planted synthetic model")
    p.add_argument("--noise", type=float, default=0.5, help="synthetic rating noise (std, on a 1..5 scale)")
    p.add_argument("--rank", type=int, default=32, help="model rank of both trainers on the synthetic set")
    p.add_argument("--als-iterations", type=int, default=10)
    p.add_argument("--als-curve", type=int, nargs="*", default=[],
                   help="synthetic: also fit ALS with these fewer iterations first (e.g. 1 2 5), for its RMSE per iteration count")
    p.add_argument("--als-reg", type=float, default=0.1)
    p.add_argument("--dsgd-epochs", type=int, default=30)
    p.add_argument("--dsgd-reg", type=float, default=0.08)
    p.add_argument("--dsgd-step", type=float, default=0.2)
    p.add_argument("--eval-sample", type=int, default=10_000_000, help="DSGD's per-epoch test RMSE on this many test ratings (train.eval_sample)")
    p.add_argument("--folds", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="ml-100k folds uN.base / uN.test")
    p.add_argument("--epochs-of-all-folds", action="store_true", help="ml-100k: print DSGD epochs of every fold, not just the first")
    p.add_argument("--master", default="local[2]")
    p.add_argument("--driver-memory", default="12g")
    p.add_argument("--work", default=None, help="scratch folder (default: a new temporary folder)")
    return p.parse_args(argv)


def session(args: argparse.Namespace, work: str) -> SparkSession:
    return bench_session(master=args.master, driver_memory=args.driver_memory, work=work, app="bench-dsgd-vs-als")


def _indexed(df: DataFrame, user: str, item: str) -> DataFrame:
    return df.select(
        F.col(user).cast("int").alias(S.USER_IDX), F.col(item).cast("int").alias(S.ITEM_IDX), F.col(S.RATING).cast("double").alias(S.RATING)
    )


def cached(spark: SparkSession, df: DataFrame, path: str) -> DataFrame:
    """``df`` written to parquet at ``path``, read back, cached and counted (nothing timed later recomputes it)."""
    df.write.mode("overwrite").parquet(path)
    out = spark.read.parquet(path).cache()
    out.count()
    return out


class EpochLog:
    """The DSGD epoch callback: prints a row per epoch and remembers when the test RMSE reached a target."""

    def __init__(self, started: float, target: float | None, *, quiet: bool = False):
        self.started, self.target, self.quiet = started, target, quiet
        self.best_loss = math.inf
        self.reached: tuple[int, float] | None = None
        self.records: list[tuple[EpochRecord, float, bool]] = []

    def __call__(self, r: EpochRecord) -> None:
        elapsed = time.perf_counter() - self.started
        kept = r.loss is not None and math.isfinite(r.loss) and r.loss < self.best_loss
        if kept:
            self.best_loss = r.loss
        self.records.append((r, elapsed, kept))
        if kept and self.reached is None and self.target is not None and r.test_rmse is not None and r.test_rmse <= self.target:
            self.reached = (r.epoch, elapsed)
        if not self.quiet:
            test = "-" if r.test_rmse is None else f"{r.test_rmse:.4f}"  # a rolled-back epoch is not evaluated
            print(f"  {'dsgd':<5} {r.epoch:>5} {r.seconds:>8.2f} {elapsed:>9.2f} {r.loss:>9.4f} {r.train_rmse:>9.4f} "
                  f"{test:>9} {r.step_size:>8.4g}{'' if kept else '  rolled back'}", flush=True)

    @property
    def last_kept_test(self) -> float:
        kept = [r.test_rmse for r, _, k in self.records if k and r.test_rmse is not None]
        return kept[-1] if kept else float("nan")


HEADER = f"  {'':<5} {'epoch':>5} {'epoch s':>8} {'elapsed':>9} {'loss':>9} {'train':>9} {'test':>9} {'step':>8}"


def recache(train: DataFrame, test: DataFrame) -> None:
    """Drop what a fit left cached (MLlib's RDDs, model frames) and cache the splits again."""
    release_cached(train.sparkSession)
    train.cache().count()
    test.cache().count()


def fit_als(train: DataFrame, test: DataFrame, cfg: Config) -> tuple[float, EpochRecord]:
    """One ALS fit, printed as a row: (fit seconds, its record)."""
    started = time.perf_counter()
    rec = make_trainer(cfg).fit(train, test=test).epochs[-1]
    als_s = time.perf_counter() - started
    iters = cfg.train.epochs * cfg.train.bias_rounds
    print(f"  {'als':<5} {iters:>5} {als_s / iters:>8.2f} {als_s:>9.2f} {'':>9} {rec.train_rmse:>9.4f} "
          f"{rec.test_rmse:>9.4f}   ({iters} iterations in one fit; epoch s = fit / iterations)", flush=True)
    recache(train, test)
    return als_s, rec


def warm_up(train: DataFrame, test: DataFrame, als_cfg: Config, dsgd_cfg: Config) -> float:
    """Untimed short fits of both trainers on a 1% sample: JVM JIT, Python workers and numba's cache
    are warm before anything is timed, so neither trainer pays the start-up for the other."""
    started = time.perf_counter()
    small_train, small_test = train.sample(fraction=0.01, seed=1).cache(), test.sample(fraction=0.01, seed=1).cache()
    make_trainer(replace(als_cfg, train=replace(als_cfg.train, epochs=1))).fit(small_train, test=small_test)
    warm_dsgd = replace(dsgd_cfg, run=replace(dsgd_cfg.run, run_id=f"{dsgd_cfg.run.run_id}-warm-up"), train=replace(dsgd_cfg.train, epochs=1))
    make_trainer(warm_dsgd).fit(small_train, test=small_test)
    recache(train, test)
    return time.perf_counter() - started


def compare(train: DataFrame, test: DataFrame, als_cfg: Config, dsgd_cfg: Config, *, quiet_epochs: bool = False,
            als_curve: tuple[int, ...] = ()) -> dict:
    """ALS, then DSGD (with ALS's final test RMSE as the target) on one split; their figures.

    ``als_curve``: ALS iteration counts fitted (and printed) first, each a fit of its own.
    """
    for iterations in als_curve:
        fit_als(train, test, replace(als_cfg, train=replace(als_cfg.train, epochs=iterations)))
    als_s, als_rec = fit_als(train, test, als_cfg)

    if not quiet_epochs:
        print(HEADER)
    started = time.perf_counter()
    log = EpochLog(started, als_rec.test_rmse, quiet=quiet_epochs)
    make_trainer(dsgd_cfg).fit(train, test=test, callback=log)
    dsgd_s = time.perf_counter() - started
    first_epoch_start = log.records[0][1] - log.records[0][0].seconds
    epoch_s = [r.seconds for r, _, _ in log.records]
    out = {
        "als_s": als_s, "als_test": als_rec.test_rmse, "dsgd_s": dsgd_s, "dsgd_test": log.last_kept_test,
        "layout_s": first_epoch_start, "epoch_s": float(np.median(epoch_s)), "reached": log.reached,
        "ratio": log.reached[1] / als_s if log.reached else None,
    }
    reach = (f"epoch {log.reached[0]} after {log.reached[1]:.1f} s" if log.reached else f"not within {len(log.records)} epochs")
    ratio = f"{out['ratio']:.3f}" if out["ratio"] is not None else "n/a"
    print(f"  dsgd: fit {dsgd_s:.1f} s (layout and first checkpoint {first_epoch_start:.1f} s, median epoch {out['epoch_s']:.2f} s), "
          f"final test RMSE {out['dsgd_test']:.4f}; ALS {als_s:.1f} s, test RMSE {als_rec.test_rmse:.4f}")
    print(f"  dsgd reaches ALS's test RMSE {als_rec.test_rmse:.4f}: {reach}; ratio to ALS's fit time {ratio}")
    release_cached(train.sparkSession)
    return out


def bench_synthetic(spark: SparkSession, args: argparse.Namespace, work: str) -> None:
    common = [f"run.checkpoint_dir={work}/ck", "input.format=synthetic", f"input.synthetic.users={args.users}",
              f"input.synthetic.items={args.items}", f"input.synthetic.ratings={args.ratings}",
              f"input.synthetic.rank={args.planted_rank}", f"input.synthetic.noise={args.noise}", f"train.rank={args.rank}"]
    als_cfg = load_config(None, common + ["train.algorithm=als", f"train.epochs={args.als_iterations}", f"train.reg={args.als_reg}",
                                          "train.bias_rounds=1", "run.run_id=synthetic-als"])
    dsgd_cfg = load_config(None, common + ["train.algorithm=dsgd", f"train.epochs={args.dsgd_epochs}", f"train.reg={args.dsgd_reg}",
                                           f"train.step_size={args.dsgd_step}", f"train.eval_sample={args.eval_sample}",
                                           "train.tol=0", "run.run_id=synthetic-dsgd"])  # every epoch, for the curve
    started = time.perf_counter()
    ratings = generate_ratings(spark, cfg=als_cfg.input.synthetic, rating_range=als_cfg.input.rating_range)
    train, test = random_split(_indexed(ratings, S.USER_ID, S.ITEM_ID), test_fraction=0.2, seed=als_cfg.run.seed)
    train, test = cached(spark, train, f"{work}/synthetic/train"), cached(spark, test, f"{work}/synthetic/test")
    n_train, n_test = train.count(), test.count()
    print(f"\n== synthetic: {n_train:,} train / {n_test:,} test ratings, {args.users:,} users x {args.items:,} items, "
          f"planted rank {args.planted_rank}, noise {args.noise:g} (generated, written and cached in {time.perf_counter() - started:.0f} s)")
    print(f"   ALS rank {args.rank}, reg {args.als_reg:g}, {args.als_iterations} iterations, 1 bias round; "
          f"DSGD rank {args.rank}, reg {args.dsgd_reg:g}, step {args.dsgd_step:g}, {args.dsgd_epochs} epochs, "
          f"d = {task_slots(spark)}")
    print(f"   untimed warm-up fits on a 1% sample: {warm_up(train, test, als_cfg, dsgd_cfg):.1f} s", flush=True)
    out = compare(train, test, als_cfg, dsgd_cfg, als_curve=tuple(args.als_curve))
    ratio = f"{out['ratio']:.3f}" if out["ratio"] is not None else "n/a (not reached)"
    print(f"synthetic: DSGD time to ALS's test RMSE / ALS fit time = {ratio} (goal <= {RATIO_GOAL}); "
          f"DSGD {out['dsgd_test']:.4f} vs ALS {out['als_test']:.4f} test RMSE; "
          f"DSGD epoch {out['epoch_s']:.2f} s vs ALS iteration {out['als_s'] / args.als_iterations:.2f} s")


def bench_ml100k(spark: SparkSession, args: argparse.Namespace, work: str) -> None:
    if not (ML100K / "u1.base").is_file():
        print(f"\n== ml100k: skipped, {ML100K} not found")
        return
    common = [f"run.checkpoint_dir={work}/ck"]
    results = {}
    for fold in args.folds:
        als_cfg = load_config(REPO / "conf" / "local.yaml", common + ["train.algorithm=als", f"run.run_id=ml100k-u{fold}-als"])
        dsgd_cfg = load_config(REPO / "conf" / "ml100k-dsgd.yaml", common + [f"run.run_id=ml100k-u{fold}-dsgd"])
        if fold == args.folds[0]:
            a, d = als_cfg.train, dsgd_cfg.train
            print(f"\n== ml100k u{'/u'.join(map(str, args.folds))}: ALS (conf/local.yaml) rank {a.rank}, reg {a.reg:g}, "
                  f"{a.epochs} iterations x {a.bias_rounds} bias rounds; DSGD (conf/ml100k-dsgd.yaml) rank {d.rank}, reg {d.reg:g}, "
                  f"step {d.step_size:g}, {d.epochs} epochs, d = {d.blocks or spark.sparkContext.defaultParallelism}")
        train, test = (
            cached(spark, _indexed(read_movielens(spark, str(ML100K / f"u{fold}.{part}")).select(
                (F.col("userId").cast("int") - 1).alias("u"), (F.col("movieId").cast("int") - 1).alias("i"),
                F.col("rating").cast("double").alias(S.RATING)), "u", "i"), f"{work}/ml100k/u{fold}-{part}")
            for part in ("base", "test")
        )
        print(f"u{fold}: {train.count():,} train / {test.count():,} test ratings")
        if fold == args.folds[0]:
            print(f"   untimed warm-up fits on a 1% sample: {warm_up(train, test, als_cfg, dsgd_cfg):.1f} s", flush=True)
        quiet = fold != args.folds[0] and not args.epochs_of_all_folds
        results[fold] = compare(train, test, als_cfg, dsgd_cfg, quiet_epochs=quiet)
    print("\nml100k test RMSE per fold   " + "  ".join(f"u{f}" + " " * 5 for f in results) + "  mean")
    for name, key in (("ALS ", "als_test"), ("DSGD", "dsgd_test")):
        vals = [r[key] for r in results.values()]
        print(f"  {name} {'':<20} " + "  ".join(f"{v:.4f}" for v in vals) + f"  {np.mean(vals):.4f}")
    for name, key in (("ALS fit s", "als_s"), ("DSGD fit s", "dsgd_s")):
        vals = [r[key] for r in results.values()]
        print(f"  {name:<24} " + "  ".join(f"{v:>6.1f}" for v in vals) + f"  {np.mean(vals):>6.1f}")
    ratios = [r["ratio"] for r in results.values()]
    print("  DSGD to ALS RMSE / ALS s " + "  ".join(f"{r:>6.3f}" if r is not None else "   n/a" for r in ratios))
    print("  goals: 5-fold mean <= 0.912, u1 <= 0.920 (LIBMF 0.9168 / 0.9235, Spark ALS 5-fold 0.9219)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("mfdist").setLevel(logging.ERROR)  # the bold driver's rollbacks are marked in the table
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        spark = session(args, work)
        print(f"dsgd vs als: {os.cpu_count()} CPU cores, master {args.master}, driver memory {args.driver_memory}, "
              f"default parallelism {spark.sparkContext.defaultParallelism}")
        try:
            if "synthetic" in args.datasets:
                bench_synthetic(spark, args, work)
            if "ml100k" in args.datasets:
                bench_ml100k(spark, args, work)
        finally:
            spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
