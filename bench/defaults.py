"""Per-trainer defaults on rating sets of several kinds: the job's test RMSE with each candidate setting.

    python bench/defaults.py                                   # ALS and DSGD as conf/local.yaml has them
    python bench/defaults.py --candidate "train.dsgd.reg=0.1" --candidate "train.dsgd.rank=20 train.dsgd.reg=0.1"
    python bench/defaults.py --folds                           # ml-100k: the mean over u1..u5 too

Every setting runs the whole job (``mfdist.pipeline.run`` with conf/local.yaml and
``--set``-style overrides, no top-N, RMSE and MAE only) in one Spark application
(local[2]) on:

- ``ml-100k``: MovieLens 100k u1.base / u1.test (skipped when ../shared/data/ml-100k is absent);
- ``planted``: conf/local.yaml's synthetic set (20k users x 2k items, 1M draws, planted rank 8,
  noise 0.5, continuous ratings on 1..5), a random 20% test split;
- ``half-stars``: planted ratings on 0.5..5 rounded to half stars (300k draws);
- ``0-10``: planted ratings on 0..10 rounded to integers (300k draws);
- ``sparse``: 100k users x 5k items, 250k draws (most users have one to three ratings), 1..5 integers.

The four synthetic sets are written as Parquet first and read by the job's own
ingest. Printed: test RMSE (and fit seconds) per set and setting; a setting
"holds up" where it is no worse than ALS's on that set.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pyspark.sql import SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from harness import bench_session  # noqa: E402
from mfdist import schema as S  # noqa: E402
from mfdist.config import SyntheticConfig, load_config  # noqa: E402
from mfdist.pipeline import run  # noqa: E402
from mfdist.synth import generate_ratings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ML100K = REPO.parent / "shared" / "data" / "ml-100k"


@dataclass(frozen=True)
class RatingSet:
    name: str
    overrides: tuple[str, ...]  # input and split keys


def planted_parquet(spark: SparkSession, folder: str, *, users: int, items: int, ratings: int,
                    rating_range: list[float], step: float) -> str:
    """Planted ratings on ``rating_range`` rounded to multiples of ``step``, written as Parquet."""
    cfg = SyntheticConfig(users=users, items=items, ratings=ratings, rank=8, seed=7, noise=0.5)
    lo = rating_range[0]
    df = generate_ratings(spark, cfg=cfg, rating_range=rating_range)
    rounded = (F.round((F.col(S.RATING) - lo) / step) * step + lo).alias(S.RATING)
    df.select(S.USER_ID, S.ITEM_ID, rounded).write.mode("overwrite").parquet(folder)
    return folder


def rating_sets(spark: SparkSession, work: str, *, folds: bool) -> list[RatingSet]:
    sets = []
    if (ML100K / "u1.base").is_file():
        for k in range(1, 6 if folds else 2):
            sets.append(RatingSet(f"ml-100k u{k}", (
                "input.format=movielens", f"input.path={ML100K}/u{k}.base", "split.method=file", f"split.test_path={ML100K}/u{k}.test",
            )))
    sets.append(RatingSet("planted", ()))
    generated = (
        ("half-stars", dict(users=20_000, items=2_000, ratings=300_000, rating_range=[0.5, 5.0], step=0.5)),
        ("0-10", dict(users=20_000, items=2_000, ratings=300_000, rating_range=[0.0, 10.0], step=1.0)),
        ("sparse", dict(users=100_000, items=5_000, ratings=250_000, rating_range=[1.0, 5.0], step=1.0)),
    )
    for name, spec in generated:
        path = planted_parquet(spark, f"{work}/{name}", **spec)
        lo, hi = spec["rating_range"]
        sets.append(RatingSet(name, ("input.format=parquet", f"input.path={path}", f"input.rating_range=[{lo},{hi}]")))
    return sets


def job_rmse(spark: SparkSession, work: str, rating_set: RatingSet, setting: list[str], run_id: str) -> tuple[float, float, str]:
    """(test RMSE, train seconds, the trainer's resolved settings) of one job run."""
    cfg = load_config(REPO / "conf" / "local.yaml", [
        *rating_set.overrides, *setting, f"output.root={work}/lake-{run_id}", f"run.checkpoint_dir={work}/ck", f"run.run_id={run_id}",
        "output.database=null", "output.top_n=0", "output.similar_items=0", "evaluate.metrics=[rmse,mae]",
    ])
    result = run(spark, cfg)
    t = cfg.train
    # train/reg: the reg the model was fitted with (train.tune_reg's choice).
    reg = result.metrics.get(("train", "reg"), t.reg)
    used = f"{t.algorithm} rank {t.rank} reg {reg:g} epochs {int(result.metrics.get(('train', 'epochs_run'), t.epochs))}" + (f" step {t.step_size}" if t.algorithm == "dsgd" else "")
    return result.metrics[("evaluate", "rmse")], result.metrics[("train", "seconds")], used


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidate", action="append", default=[], metavar="OVERRIDES",
                        help="a DSGD setting to try besides its defaults (space-separated key=value)")
    parser.add_argument("--folds", action="store_true", help="ml-100k: all five folds")
    parser.add_argument("--sets", nargs="+", metavar="NAME", help="only these rating sets (ml-100k, planted, half-stars, 0-10, sparse)")
    parser.add_argument("--algorithms", nargs="*", default=["als", "dsgd"], choices=["als", "dsgd"],
                        help="the defaults to run (--candidate settings run in any case)")
    parser.add_argument("--driver-memory", default="8g")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = {"als (conf/local.yaml)": ["train.algorithm=als"], "dsgd defaults": ["train.algorithm=dsgd"]}
    settings = {label: setting for label, setting in settings.items() if label.split()[0] in args.algorithms}
    for text in args.candidate:
        settings[f"dsgd {text}"] = ["train.algorithm=dsgd", *shlex.split(text)]
    with tempfile.TemporaryDirectory(prefix="bench-defaults-") as work:
        spark = bench_session(master="local[2]", driver_memory=args.driver_memory, work=work, app="bench-defaults")
        # What conf/local.yaml's spark.conf sets for the job (this session is built here, not by the job).
        spark.conf.set("spark.sql.shuffle.partitions", "4")
        spark.conf.set("spark.sql.adaptive.enabled", "false")
        sets = [s for s in rating_sets(spark, work, folds=args.folds) if not args.sets or s.name.split()[0] in args.sets]
        print(f"defaults: {len(sets)} rating sets x {len(settings)} settings, local[2]")
        results: dict[tuple[str, str], float] = {}
        n = 0
        for rating_set in sets:
            for label, setting in settings.items():
                n += 1
                started = time.perf_counter()
                rmse, train_s, used = job_rmse(spark, work, rating_set, setting, run_id=f"r{n}")
                results[rating_set.name, label] = rmse
                print(f"  {rating_set.name:12s} {label:40s} test RMSE {rmse:.4f}  train {train_s:6.1f} s  job {time.perf_counter() - started:6.1f} s  ({used})", flush=True)
        print("\n" + " " * 42 + "".join(f"{s.name:>13s}" for s in sets))
        for label in settings:
            print(f"  {label:40s}" + "".join(f"{results[s.name, label]:13.4f}" for s in sets))
        folds = [s.name for s in sets if s.name.startswith("ml-100k")]
        if len(folds) > 1:
            for label in settings:
                print(f"  ml-100k {len(folds)}-fold mean, {label}: {sum(results[f, label] for f in folds) / len(folds):.4f}")
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
