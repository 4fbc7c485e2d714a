"""Benchmark of the blocked top-K: mfdist's top-10 against ALSModel.recommendForAllUsers(10) on the same factors.

    python bench/topn.py [--users 200000] [--items 20000] [--rank 32] [--k 10] [--master local[2]]

Random normal user and item factors are generated in Spark and written to
parquet once; every method reads those files. The comparison is on pure dot
products (``user_lists(..., biases=False)``, nothing excluded), the setting of
recommendForAllUsers, which has no biases and no seen-item exclusion; ALS gets
the factors through an ALSModel built on the factor frames (no training).

Each method runs in its own Spark application (a child process of this script
with the same master and driver memory), so its peak memory is its own: this
process samples the resident memory (``/proc/<pid>/statm``) of the child's
whole tree (Python driver, JVM, Python workers) every 0.1 s. Each child first
runs its method on 1% of the users (JIT and Python worker start-up), then times
the full run, ending in a parquet write of the lists. Then both list tables are
joined in Spark and compared rank by rank: a position where the items differ is
a tie when the two scores there agree to 1e-5 (relative), else a mismatch.
The similar-items run (cosine over the same item factors) is timed the same way.

    python bench/topn.py --job [--users 200000 --items 20000 --ratings 4000000]

The same comparison in the job, as a user pays it: ``jobs/train.py`` on
conf/local.yaml (synthetic planted ratings over those users and items, DSGD
rank 32, 3 epochs, top-10, 10 similar items, ranking metrics on) reports its
recommend stage's seconds (both lists, the ranking metrics and the writes);
then ``jobs/recommend.py`` rescores that run from its id alone, and a Spark
application loads the run's published factors into an ALSModel and writes
``recommendForAllUsers(10)``. Printed: the recommend stage against the ALS
call (with its write), and the two processes' wall times (start included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pyspark.ml.recommendation import ALSModel  # noqa: E402
from pyspark.sql import DataFrame, SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from mfdist import lake  # noqa: E402
from mfdist import schema as S  # noqa: E402
from harness import rss_kb, run_child, tree  # noqa: E402
from mfdist.recommend import similar_item_lists, user_lists  # noqa: E402
from mfdist.model import Model  # noqa: E402

PHASES = ("data", "mfdist", "similar", "als", "compare", "als-run")
REPO = Path(__file__).resolve().parents[1]
WARMUP_FRACTION = 0.01


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--master", default="local[2]")
    p.add_argument("--driver-memory", default="16g")
    p.add_argument("--partitions", type=int, default=0, help="partitions of each factor frame (default: 2 x cores)")
    p.add_argument("--broadcast-max-mb", type=int, default=256)
    p.add_argument("--work", default=None, help="scratch folder (default: a new temporary folder)")
    p.add_argument("--job", action="store_true", help="compare in the job: the recommend stage and jobs/recommend.py")
    p.add_argument("--ratings", type=int, default=4_000_000, help="with --job: planted ratings drawn")
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------- memory sampling from /proc


def tree_rss_kb(root: int) -> int:
    """Summed RSS of ``root`` and every process under it."""
    return sum(rss_kb(p) for p in tree(root))


def spawn_phase(args: argparse.Namespace, phase: str) -> tuple[dict, float]:
    """Run ``phase`` in a child process; its JSON result line and the peak RSS (GB) of its process tree."""
    argv = [sys.executable, __file__, "--phase", phase, "--work", args.work] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("phase", "work", "job")
    ]
    out, (peak_gb,) = run_child(argv, lambda pid: (tree_rss_kb(pid),), f"phase {phase}")
    return out, peak_gb


# ---------------------------------------------------------------- the phases (each in its own Spark application)


def session(args: argparse.Namespace) -> SparkSession:
    spark = (
        SparkSession.builder.master(args.master)
        .appName(f"bench-topn-{args.phase}")
        .config("spark.driver.memory", args.driver_memory)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    parts = args.partitions or 2 * spark.sparkContext.defaultParallelism
    spark.conf.set("spark.sql.shuffle.partitions", str(parts))
    return spark


def random_factors(spark: SparkSession, n: int, rank: int, seed: int) -> DataFrame:
    """id int, features array<float>: standard normal factors, generated in Spark."""
    values = F.array(*[F.randn(seed * 1000 + j) for j in range(rank)]).cast("array<float>")
    return spark.range(n).select(F.col("id").cast("int").alias("id"), values.alias("features"))


def factors(spark: SparkSession, work: str, side: str) -> DataFrame:
    parts = int(spark.conf.get("spark.sql.shuffle.partitions"))
    return spark.read.parquet(f"{work}/{side}").repartition(parts)


def als_lists(spark: SparkSession, users: DataFrame, items: DataFrame, rank: int, k: int) -> DataFrame:
    """recommendForAllUsers(k) of an ALSModel built on the factor frames (id, features), as ALS.fit would."""
    jvm = spark.sparkContext._jvm
    java_model = jvm.org.apache.spark.ml.recommendation.ALSModel("bench", rank, users._jdf, items._jdf)
    return ALSModel(java_model.setUserCol("user").setItemCol("item")).recommendForAllUsers(k)


def mfdist_model(users: DataFrame, items: DataFrame, rank: int) -> Model:
    def side(df: DataFrame, idx: str) -> DataFrame:
        return df.select(F.col("id").alias(idx), F.lit(0.0).cast("float").alias(S.BIAS), F.col("features").alias(S.FACTORS))

    return Model(mu=0.0, users=side(users, S.USER_IDX), items=side(items, S.ITEM_IDX), rank=rank)


def method_lists(args: argparse.Namespace, users: DataFrame, items: DataFrame) -> DataFrame:
    spark = users.sparkSession
    if args.phase == "als":
        return als_lists(spark, users, items, args.rank, args.k)
    model = mfdist_model(users, items, args.rank)
    if args.phase == "similar":
        return similar_item_lists(model.items, k=args.k, broadcast_max_mb=args.broadcast_max_mb)
    return user_lists(model, None, k=args.k, broadcast_max_mb=args.broadcast_max_mb, biases=False)


def compare(spark: SparkSession, work: str) -> dict[str, int]:
    """Rank-by-rank agreement of the two list tables (a Spark join; only counts reach the driver)."""
    ours = spark.read.parquet(f"{work}/mfdist").select(
        F.col(S.USER_IDX).alias("user"), "rank", F.col(S.ITEM_IDX).alias("ours"), F.col("score").alias("s_ours")
    )
    als = spark.read.parquet(f"{work}/als").select("user", F.posexplode("recommendations").alias("pos", "rec")).select(
        "user", (F.col("pos") + 1).alias("rank"), F.col("rec.item").alias("als"), F.col("rec.rating").alias("s_als")
    )
    joined = ours.join(als, ["user", "rank"], "full_outer")
    differ = F.col("ours") != F.col("als")
    same_score = F.abs(F.col("s_ours") - F.col("s_als")) <= 1e-5 * F.greatest(F.abs("s_als"), F.lit(1.0))
    row = joined.agg(
        F.countDistinct("user").alias("users"),
        F.count(F.lit(1)).alias("positions"),
        F.sum((F.col("ours") == F.col("als")).cast("int")).alias("identical"),
        F.sum((differ & same_score).cast("int")).alias("ties"),
        F.sum((differ & ~same_score).cast("int")).alias("mismatched"),
        F.sum((F.col("ours").isNull() | F.col("als").isNull()).cast("int")).alias("missing"),
    ).first()
    return {k: int(v or 0) for k, v in row.asDict().items()}


def published_als_lists(spark: SparkSession, root: str, run_id: str, k: int) -> DataFrame:
    """recommendForAllUsers(k) of an ALSModel on run ``run_id``'s published factors (by index)."""
    def side(table: str, idx: str) -> DataFrame:
        return lake.read_partition(spark, root, table, run_id).select(F.col(idx).alias("id"), F.col(S.FACTORS).alias("features"))

    users, items = side(S.USER_FACTORS, S.USER_IDX), side(S.ITEM_FACTORS, S.ITEM_IDX)
    return als_lists(spark, users, items, len(items.first()["features"]), k)


def run_phase(args: argparse.Namespace) -> dict:
    spark = session(args)
    try:
        if args.phase == "als-run":
            started = time.perf_counter()
            published_als_lists(spark, f"{args.work}/lake", "bench", args.k).write.parquet(f"{args.work}/als-run")
            return {"seconds": time.perf_counter() - started}
        if args.phase == "data":
            random_factors(spark, args.users, args.rank, 1).write.parquet(f"{args.work}/users")
            random_factors(spark, args.items, args.rank, 2).write.parquet(f"{args.work}/items")
            return {}
        if args.phase == "compare":
            return compare(spark, args.work)
        users, items = factors(spark, args.work, "users"), factors(spark, args.work, "items")
        warm = users.where(F.col("id") < max(1, int(args.users * WARMUP_FRACTION)))
        method_lists(args, warm, items).write.format("noop").mode("overwrite").save()
        started = time.perf_counter()
        method_lists(args, users, items).write.parquet(f"{args.work}/{args.phase}")
        return {"seconds": time.perf_counter() - started}
    finally:
        spark.stop()


def timed_process(argv: list[str]) -> float:
    """Wall seconds of ``argv`` run from the repository root (its output kept only when it fails)."""
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{argv[1]} failed with exit code {done.returncode}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def in_job(args: argparse.Namespace) -> int:
    """The recommend stage of a training run and jobs/recommend.py against recommendForAllUsers on its factors."""
    root = f"{args.work}/lake"
    common = [f"output.root={root}", "run.run_id=bench", f"spark.master={args.master}",
              f"spark.conf.spark.driver.memory={args.driver_memory}", f"output.top_n={args.k}", f"output.similar_items={args.k}"]
    timed_process([sys.executable, "jobs/train.py", "--conf", "conf/local.yaml", "--set", *common,
                   f"input.synthetic.users={args.users}", f"input.synthetic.items={args.items}",
                   f"input.synthetic.ratings={args.ratings}", "input.synthetic.rank=16", "train.algorithm=dsgd",
                   f"train.rank={args.rank}", "train.epochs=3", f"evaluate.k={args.k}", f"run.checkpoint_dir={args.work}/ck"])
    report = json.loads(Path(root, "_runs", "bench", "report", "metrics.json").read_text())
    stage = report["metrics"]["recommend"]["seconds"]
    rescore = timed_process([sys.executable, "jobs/recommend.py", "--conf", "conf/local.yaml", "--set", *common])
    started = time.perf_counter()
    out, _ = spawn_phase(args, "als-run")
    als_process = time.perf_counter() - started
    print(f"recommend stage in the job (top-{args.k}, similar items, ranking metrics, writes) {stage:6.1f} s; "
          f"recommendForAllUsers({args.k}) + write {out['seconds']:6.1f} s: {out['seconds'] / stage:.1f}x")
    print(f"jobs/recommend.py from the run id, whole process {rescore:6.1f} s; ALSModel on the published factors + "
          f"recommendForAllUsers({args.k}), whole process {als_process:6.1f} s: {als_process / rescore:.1f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.phase:
        print(json.dumps(run_phase(args)))
        return 0
    args.work = args.work or tempfile.mkdtemp(prefix="bench-topn-")
    if args.job:
        print(f"in the job: {args.ratings} planted ratings over {args.users} users x {args.items} items, rank {args.rank}; "
              f"{args.master} on {os.cpu_count()} cores, driver memory {args.driver_memory}; scratch {args.work}", flush=True)
        return in_job(args)
    print(f"{args.users} users x {args.items} items, rank {args.rank}, top-{args.k}; {args.master} on "
          f"{os.cpu_count()} cores, driver memory {args.driver_memory}; scratch {args.work}", flush=True)
    spawn_phase(args, "data")
    results = {}
    for phase, label in (("mfdist", "mfdist user_lists (dot only)"), ("als", "ALS recommendForAllUsers"),
                         ("similar", "mfdist similar_item_lists")):
        out, peak_gb = spawn_phase(args, phase)
        results[phase] = (out["seconds"], peak_gb)
        print(f"{label:<32} {out['seconds']:8.1f} s   peak RSS {peak_gb:6.2f} GB", flush=True)
    agreement, _ = spawn_phase(args, "compare")
    print(f"lists: {agreement['users']} users, {agreement['positions']} positions: {agreement['identical']} identical, "
          f"{agreement['ties']} differ on equal scores, {agreement['mismatched']} mismatched, {agreement['missing']} missing")
    (t_ours, m_ours), (t_als, m_als) = results["mfdist"], results["als"]
    print(f"mfdist vs recommendForAllUsers: {t_als / t_ours:.1f}x faster, peak RSS {m_ours / m_als:.2f} of its")
    return 0 if agreement["mismatched"] == agreement["missing"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
