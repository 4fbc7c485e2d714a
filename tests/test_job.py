"""The job as a user runs it: a CSV with bad rows lands every bad row in rejected_ratings."""

import subprocess
import sys
from pathlib import Path

from pyspark.sql import functions as F

from mfdist import lake
from mfdist import schema as S

REPO = Path(__file__).resolve().parents[1]


def test_csv_with_bad_rows_counts_add_up(spark, tmp_path):
    good = [f"u{u},i{i},{1 + (u + i) % 5},{1600000000 + u * 10 + i}" for u in range(40) for i in range(15) if (u * i) % 3]
    bad = ["u1,,3,1600000000", ",i2,3,1600000000", "u3,i3,x,1600000000", "u4,i4,7,1600000000", "u5,i5,2,notatime"]
    path = tmp_path / "ratings.csv"
    path.write_text("user,item,stars,when\n" + "\n".join(good + bad) + "\n")
    root = tmp_path / "lake"
    proc = subprocess.run(
        [
            sys.executable, "jobs/train.py", "--conf", "conf/local.yaml", "--set", "input.format=csv", f"input.path={path}",
            "input.columns.user=user", "input.columns.item=item", "input.columns.rating=stars", "input.columns.timestamp=when",
            f"output.root={root}", f"run.checkpoint_dir={tmp_path}/ck", "run.run_id=csv1", "spark.master=local[2]",
            "train.rank=3", "train.epochs=3", "train.bias_rounds=1", "spark.conf.spark.sql.shuffle.partitions=2",
            "spark.conf.spark.default.parallelism=2", "output.database=null",
        ],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test RMSE" in proc.stdout
    runs = lake.read_table(spark, str(root), S.RUNS).first()
    assert (runs.status, runs.input_rows, runs.accepted_rows, runs.rejected_rows) == ("succeeded", len(good) + 5, len(good), 5)
    rejected = lake.read_table(spark, str(root), S.REJECTED_RATINGS)
    reasons = sorted(r.reason for r in rejected.collect())
    assert reasons == sorted(["null item_id", "null user_id", "rating not a number", "rating out of range", "bad timestamp"])
    assert rejected.where(F.col("rating") == "x").count() == 1
