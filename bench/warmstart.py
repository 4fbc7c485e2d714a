"""Scheduled retraining: a warm-started nightly run against a cold one, and fold-in against a full retrain.

    python bench/warmstart.py                       # both scenarios, synthetic 5M (and ml-100k when present)
    python bench/warmstart.py --ratings 1000000 --scenarios foldin

Every run is a whole job as a user's scheduler starts it (``jobs/train.py`` or
``jobs/foldin.py`` with conf/local.yaml, local[2], no catalog), timed as a
process; figures come from the tables the runs publish.

- ``nightly``: synthetic ratings (default 5M draws, 100k users x 10k items,
  planted rank 16, DSGD rank 32) with a fixed random 10% test set. Night 1
  trains on the training ratings of the first 95% by timestamp; night 2 on all
  of them, (a) cold and (b) warm from night 1. Printed: the epochs and train
  seconds each needs to reach the cold run's final per-epoch test RMSE (train
  seconds to epoch k = the train stage's time outside its epochs, such as the
  layout, plus its first k epochs), and the ratio warm / cold train time.
- ``foldin``: on the synthetic set and ml-100k's u.data (skipped when absent):
  a seeded 10% of users is held out of the base run; their ratings are split
  80/20 by a seeded hash; the 80% is folded into the base run and the 20%
  scored; a full retrain on the base ratings plus that 80% is scored on the
  same rows. Printed: both RMSEs and both process times.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pyspark.sql import DataFrame, SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from harness import bench_session  # noqa: E402
from mfdist import lake  # noqa: E402
from mfdist import schema as S  # noqa: E402
from mfdist.config import SyntheticConfig  # noqa: E402
from mfdist.evaluate import rating_metrics  # noqa: E402
from mfdist.ingest import read_movielens  # noqa: E402
from mfdist.published import published_model  # noqa: E402
from mfdist.reindex import apply_index  # noqa: E402
from mfdist.synth import generate_ratings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ML100K = REPO.parent / "shared" / "data" / "ml-100k"


class Lake:
    """One output.root, its jobs run as processes, its tables read by the benchmark's session."""

    def __init__(self, spark: SparkSession, root: str, *, driver_memory: str, common: list[str]):
        self.spark, self.root = spark, root
        self.common = [f"output.root={root}", f"run.checkpoint_dir={root}-ck", "output.database=null",
                       f"spark.conf.spark.driver.memory={driver_memory}", *common]

    def job(self, script: str, run_id: str, *overrides: str) -> float:
        """Run ``jobs/<script>`` as a process; its wall seconds."""
        argv = [sys.executable, str(REPO / "jobs" / script), "--conf", str(REPO / "conf" / "local.yaml"),
                "--set", *self.common, f"run.run_id={run_id}", *overrides]
        started = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - started

    def metric(self, run_id: str, stage: str, name: str) -> float:
        rows = lake.read_partition(self.spark, self.root, S.METRICS, run_id).where((F.col("stage") == stage) & (F.col("metric") == name))
        return float(rows.first().value)

    def epochs(self, run_id: str) -> list[tuple[float, float]]:
        """(seconds, per-epoch test RMSE) of each training epoch."""
        rows = lake.read_partition(self.spark, self.root, S.EPOCHS, run_id).where(F.col("stage") == "train").orderBy("epoch")
        return [(r.seconds, r.test_rmse) for r in rows.collect()]

    def rmse(self, run_id: str, ratings: DataFrame) -> float:
        """The published model of ``run_id`` on ``ratings`` (ids), predictions clipped to 1..5 as in evaluate."""
        ui = lake.read_partition(self.spark, self.root, S.USER_INDEX, run_id)
        ii = lake.read_partition(self.spark, self.root, S.ITEM_INDEX, run_id)
        model = published_model(self.spark, self.root, run_id)
        return rating_metrics(apply_index(ratings, ui, ii), model, rating_range=[1.0, 5.0])["rmse"]


def to_reach(lake_: Lake, run_id: str, target: float) -> tuple[int | None, float | None, float]:
    """(epochs, train seconds) until the per-epoch test RMSE is <= ``target`` (None: not reached), and the train stage's seconds."""
    train_s = lake_.metric(run_id, "train", "seconds")
    epochs = lake_.epochs(run_id)
    elapsed = train_s - sum(s for s, _ in epochs)  # layout, warm start, model frames: paid whatever the epochs
    for k, (seconds, rmse) in enumerate(epochs, start=1):
        elapsed += seconds
        if rmse is not None and rmse <= target + 1e-12:
            return k, elapsed, train_s
    return None, None, train_s


def synthetic(spark: SparkSession, args: argparse.Namespace) -> DataFrame:
    cfg = SyntheticConfig(users=args.users, items=args.items, ratings=args.ratings, rank=16, seed=11, noise=0.5)
    return generate_ratings(spark, cfg=cfg, rating_range=[1.0, 5.0])


def nightly(spark: SparkSession, work: str, args: argparse.Namespace) -> None:
    ratings = synthetic(spark, args).withColumn("_h", F.xxhash64(S.USER_ID, S.ITEM_ID, F.lit(1)) % 10 == 0)
    ratings.where("_h").drop("_h").write.parquet(f"{work}/n-test")
    train = ratings.where(~F.col("_h")).drop("_h")
    cut = train.select(F.percentile_approx(F.col(S.TS).cast("long"), 0.95, 10_000)).first()[0]
    train.where(F.col(S.TS).cast("long") < cut).write.parquet(f"{work}/n-night1")
    train.write.parquet(f"{work}/n-night2")
    common = ["input.format=parquet", "split.method=file", f"split.test_path={work}/n-test", "train.algorithm=dsgd",
              f"train.rank={args.rank}", "output.top_n=0", "output.similar_items=0", "evaluate.metrics=[rmse]"]
    lk = Lake(spark, f"{work}/n-lake", driver_memory=args.driver_memory, common=common)
    night = {run_id: lk.job("train.py", run_id, f"input.path={work}/n-{data}", *extra) for run_id, data, extra in (
        ("night1", "night1", []),
        ("night2-cold", "night2", []),
        ("night2-warm", "night2", ["train.warm_start=true", "train.warm_start_run=night1", f"train.epochs={args.warm_epochs}",
                                   *args.warm_set]),
    )}
    target = lk.epochs("night2-cold")[-1][1]
    print(f"nightly: {args.ratings:,} draws, {args.users:,} users x {args.items:,} items, DSGD rank {args.rank}; "
          f"target = the cold run's final per-epoch test RMSE {target:.4f}")
    cold_k, cold_s, cold_train = to_reach(lk, "night2-cold", target)
    for run_id in ("night2-cold", "night2-warm"):
        k, seconds, train_s = to_reach(lk, run_id, target)
        reach = "not reached" if k is None else f"reached at epoch {k:2d} after {seconds:6.1f} s of training"
        print(f"  {run_id:12s} {reach}; x{(seconds or float('nan')) / cold_train:.3f} of the cold train time; "
              f"train stage {train_s:6.1f} s; final RMSE {lk.metric(run_id, 'evaluate', 'rmse'):.4f}; "
              f"whole process {night[run_id]:6.1f} s")


def foldin(spark: SparkSession, work: str, name: str, ratings: DataFrame, args: argparse.Namespace) -> None:
    held = F.abs(F.xxhash64(S.USER_ID, F.lit(7))) % 10 == 0
    given = F.abs(F.xxhash64(S.USER_ID, S.ITEM_ID, F.lit(8))) % 10 < 8
    ratings = ratings.select(S.USER_ID, S.ITEM_ID, S.RATING).cache()
    paths = {key: f"{work}/{name}-{key}" for key in ("base", "given", "scored", "retrain")}
    ratings.where(~held).write.parquet(paths["base"])
    ratings.where(held & given).write.parquet(paths["given"])
    ratings.where(held & ~given).write.parquet(paths["scored"])
    ratings.where(~(held & ~given)).write.parquet(paths["retrain"])
    common = ["input.format=parquet", "split.method=file", f"split.test_path={paths['scored']}", f"train.algorithm={args.algorithm}"]
    lk = Lake(spark, f"{work}/{name}-lake", driver_memory=args.driver_memory, common=common)
    base_s = lk.job("train.py", "base", f"input.path={paths['base']}")
    fold_s = lk.job("foldin.py", "fold", f"input.path={paths['given']}", "foldin.base_run=base")
    retrain_s = lk.job("train.py", "retrain", f"input.path={paths['retrain']}")
    # The scored rows whose item the base run has factors for (the others are unseen items to both).
    items = lake.read_partition(spark, lk.root, S.ITEM_FACTORS, "base").select(S.ITEM_ID)
    scored = spark.read.parquet(paths["scored"]).join(items, S.ITEM_ID).cache()
    fold_rmse, retrain_rmse = lk.rmse("fold", scored), lk.rmse("retrain", scored)
    users = spark.read.parquet(paths["given"]).select(S.USER_ID).distinct().count()
    print(f"foldin {name} ({args.algorithm}): {users:,} held-out users, {scored.count():,} scored ratings; base run {base_s:.1f} s")
    print(f"  fold-in  RMSE {fold_rmse:.4f}  process {fold_s:6.1f} s  (x{fold_s / retrain_s:.3f} of the retrain)")
    print(f"  retrain  RMSE {retrain_rmse:.4f}  process {retrain_s:6.1f} s  (fold-in - retrain: {fold_rmse - retrain_rmse:+.4f})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=["nightly", "foldin"], choices=["nightly", "foldin"])
    parser.add_argument("--ratings", type=int, default=5_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--warm-epochs", type=int, default=12, help="the warm run's train.epochs")
    parser.add_argument("--warm-set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides for the warm run")
    parser.add_argument("--algorithm", default="dsgd", choices=["dsgd", "als"], help="fold-in: the base run's trainer")
    parser.add_argument("--driver-memory", default="8g")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-warmstart-") as work:
        spark = bench_session(master="local[2]", driver_memory="4g", work=work, app="bench-warmstart")
        if "nightly" in args.scenarios:
            nightly(spark, work, args)
        if "foldin" in args.scenarios:
            if (ML100K / "u.data").is_file():
                raw = read_movielens(spark, str(ML100K / "u.data"))
                ml = raw.select(F.col("userId").alias(S.USER_ID), F.col("movieId").alias(S.ITEM_ID), F.col("rating").cast("double").alias(S.RATING))
                foldin(spark, work, "ml-100k", ml, args)
            else:
                print(f"foldin ml-100k: skipped ({ML100K / 'u.data'} not found)")
            foldin(spark, work, "synthetic", synthetic(spark, args), args)
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
