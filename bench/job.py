"""The whole training job as a nightly run pays it: seconds per stage, the whole process, peak memory and test
RMSE on a generated Parquet rating set, next to LIBMF's figures on the same set.

    python bench/job.py                      # 20M ratings (500k users x 50k items)
    python bench/job.py --ratings 5000000    # the quick run (125k users x 12.5k items)
    python bench/job.py --set train.epochs=20 output.top_n=10   # any job overrides

The set is drawn once per size and kept under ``--work`` (default
``/tmp/mfdist-bench-job``): planted ratings from :mod:`mfdist.synth` (rank 16,
Zipf-like activity and popularity, N draws with repeated pairs dropped) over
N / 40 users and N / 400 items, cut into train (99%) and test (1%) by a hash of
the pair and written as Parquet, so a run reads them as a user's job would
(``input.format=parquet``, ``split.method=file``). The job is then run as its own
process, ``python jobs/train.py --conf conf/local.yaml`` with DSGD rank 32, 10
epochs, ``output.top_n=0``, ``output.similar_items=0``, no ranking metrics and no
catalog (issue 13's settings), local[2] with a 12g driver. Reported: the
seconds of every stage from the run's own report (metrics.json), the whole
process's wall time (JVM start and catalog-free publish included), the peak
summed RSS of the process tree sampled from /proc every 0.1 s, and the test
RMSE. LIBMF's figures were measured on this machine on the 20M set (issue 13:
k 32, l2 0.05, 10 iterations, 2 threads); they are printed for comparison, not
re-measured here (LIBMF is not installed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import bench_session, rss_kb, tree  # noqa: E402

LIBMF = {"train_s": 15.4, "predict_s": 3.9, "rmse": 0.6970}
STAGES = ("ingest", "reindex", "split", "train", "evaluate", "recommend", "publish")
JOB_SETTINGS = [
    "train.algorithm=dsgd", "train.rank=32", "train.epochs=10", "output.top_n=0", "output.similar_items=0",
    "evaluate.metrics=[rmse,mae]", "output.database=null", "spark.master=local[2]", "spark.conf.spark.driver.memory=12g",
    "spark.conf.spark.sql.catalogImplementation=in-memory",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratings", type=int, default=20_000_000, help="planted ratings drawn (the quick run: 5000000)")
    p.add_argument("--work", default="/tmp/mfdist-bench-job", help="where the sets and the lake live (sets are reused)")
    p.add_argument("--set", nargs="*", default=[], help="more job overrides, key=value")
    p.add_argument("--phase", choices=["data"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def data_dir(args: argparse.Namespace) -> Path:
    return Path(args.work) / f"ratings-{args.ratings}"


def write_set(args: argparse.Namespace) -> None:
    """Draw the planted set and write its train and test parts as Parquet (a Spark application of its own)."""
    from pyspark.sql import functions as F

    from mfdist.config import SyntheticConfig
    from mfdist.synth import generate_ratings

    out = data_dir(args)
    spark = bench_session(master="local[2]", driver_memory="12g", work=str(out), app="bench-job-data")
    cfg = SyntheticConfig(users=args.ratings // 40, items=args.ratings // 400, ratings=args.ratings, rank=16, seed=11)
    ratings = generate_ratings(spark, cfg=cfg, rating_range=[1.0, 5.0])
    to_test = F.abs(F.xxhash64(F.lit(5), "user_id", "item_id")) % 100 == 0
    ratings.where(~to_test).write.mode("overwrite").parquet(str(out / "train"))
    ratings.where(to_test).write.mode("overwrite").parquet(str(out / "test"))
    spark.stop()
    (out / "_DONE").write_text(json.dumps({"users": cfg.users, "items": cfg.items, "draws": cfg.ratings}))


def run_job(argv: list[str]) -> tuple[float, float, str]:
    """Run the job; its wall seconds, peak RSS (GB) of its process tree, and its output."""
    started = time.perf_counter()
    child = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample() -> None:
        while child.poll() is None:
            peak[0] = max(peak[0], sum(rss_kb(p) for p in tree(child.pid)))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = child.communicate()
    seconds = time.perf_counter() - started
    sampler.join()
    if child.returncode:
        raise SystemExit(f"the job failed with exit code {child.returncode}:\n{out[-3000:]}")
    return seconds, peak[0] / 2**20, out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.phase == "data":
        write_set(args)
        return 0
    data = data_dir(args)
    if not (data / "_DONE").is_file():
        print(f"drawing {args.ratings} ratings to {data} (once per size)", flush=True)
        subprocess.run([sys.executable, __file__, "--phase", "data", "--ratings", str(args.ratings), "--work", args.work], check=True)
    shape = json.loads((data / "_DONE").read_text())
    run_id = f"bench-{time.strftime('%Y%m%dT%H%M%S')}"
    root = Path(args.work) / "lake"
    argv = [
        sys.executable, "jobs/train.py", "--conf", "conf/local.yaml", "--set", "input.format=parquet",
        f"input.path={data / 'train'}", "split.method=file", f"split.test_path={data / 'test'}", "input.columns.timestamp=ts",
        f"output.root={root}", f"run.checkpoint_dir={Path(args.work) / 'ck'}", f"run.run_id={run_id}", *JOB_SETTINGS, *args.set,
    ]
    print(f"{shape['draws']} draws over {shape['users']} users x {shape['items']} items; {os.cpu_count()} cores", flush=True)
    seconds, peak_gb, _ = run_job(argv)
    report = json.loads((root / "_runs" / run_id / "report" / "metrics.json").read_text())
    stages = report["metrics"]
    print(f"{report['input_rows']} ratings read")
    for stage in STAGES:
        if stage in stages:
            print(f"  {stage:<10} {stages[stage]['seconds']:7.1f} s")
    prep = sum(stages[s]["seconds"] for s in ("ingest", "reindex", "split"))
    print(f"  data preparation (ingest + reindex + split) {prep:.1f} s")
    print(f"whole process {seconds:.1f} s, peak RSS {peak_gb:.2f} GB, test RMSE {stages['evaluate']['rmse']:.4f}")
    print(f"LIBMF on the 20M set (issue 13): training process {LIBMF['train_s']} s + predict {LIBMF['predict_s']} s, "
          f"test RMSE {LIBMF['rmse']:.4f}; mfdist's whole process is {seconds / (LIBMF['train_s'] + LIBMF['predict_s']):.1f}x that")
    return 0


if __name__ == "__main__":
    sys.exit(main())
