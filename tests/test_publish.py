"""Publishing: the runs row commits a run (a killed run is invisible), reruns are idempotent, unsafe run ids
are refused before anything is touched, gc keeps the latest and removes what it deletes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from mfdist import lake
from mfdist import schema as S
from mfdist.catalog import register_temp_views
from mfdist.config import load_config
from mfdist.errors import ConfigError
from mfdist.lake import delta_available
from mfdist.pipeline import run
from mfdist.publish import Publisher
from mfdist.retention import apply_gc, plan_gc

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "input.synthetic.users=300", "input.synthetic.items=60", "input.synthetic.rank=3",
    "train.rank=4", "train.epochs=2", "train.bias_rounds=1", "output.top_n=3", "output.similar_items=2",
]


def _cfg(root, run_id, ratings=5000):
    return load_config(
        None, [f"output.root={root}", f"run.checkpoint_dir={root}/_ck", f"run.run_id={run_id}",
               f"input.synthetic.ratings={ratings}", *TINY],
    )


def _latest_counts(spark, root):
    register_temp_views(spark, str(root))
    return {r.run_id: r.n for r in spark.sql("SELECT run_id, count(*) AS n FROM user_factors_latest GROUP BY run_id").collect()}


@pytest.fixture(scope="module")
def lake_with_runs(spark, tmp_path_factory):
    """Three succeeded runs g1 < g2 < g3 under one root (tests below run in file order)."""
    root = tmp_path_factory.mktemp("publish") / "lake"
    users = {rid: run(spark, _cfg(root, rid, ratings=3000 + 500 * i)).model.users.count() for i, rid in enumerate(("g1", "g2", "g3"))}
    return root, users


def test_rerun_with_same_run_id_is_idempotent(spark, lake_with_runs):
    root, users = lake_with_runs
    counts = {t: lake.read_table(spark, str(root), t).count() for t in S.ALL_TABLES}
    run(spark, _cfg(root, "g3", ratings=4000))
    assert {t: lake.read_table(spark, str(root), t).count() for t in S.ALL_TABLES} == counts
    assert _latest_counts(spark, root) == {"g3": users["g3"]}
    report = Path(lake.run_files_path(str(root), "g3", "report"))
    assert {p.name for p in report.iterdir()} >= {"metrics.json", "loss_curve.png", "report.md"}
    assert "rmse" in (report / "report.md").read_text()


def test_killed_run_leaves_previous_run_readable_and_rerun_replaces_it(spark, lake_with_runs):
    root, users = lake_with_runs
    args = [f"output.root={root}", f"run.checkpoint_dir={root}/_ck", "run.run_id=k1", "input.synthetic.ratings=5000",
            *TINY, "spark.master=local[2]", "spark.conf.spark.sql.shuffle.partitions=2", "output.database=null"]
    proc = subprocess.Popen([sys.executable, "jobs/train.py", "--conf", "conf/local.yaml", "--set", *args],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # Tables are written straight into their run_id partition: kill the run while it writes them.
    partition = Path(lake.partition_path(str(root), S.USER_FACTORS, "k1"))
    deadline = time.time() + 240
    while not partition.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the job ended before publish could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    runs = {r.run_id: r.status for r in lake.read_table(spark, str(root), S.RUNS).collect()}
    assert runs == {"g1": "succeeded", "g2": "succeeded", "g3": "succeeded", "k1": "running"}
    assert _latest_counts(spark, root) == {"g3": users["g3"]}
    assert spark.sql("SELECT count(*) FROM recommendations_latest WHERE run_id = 'k1'").first()[0] == 0

    rerun = run(spark, _cfg(root, "k1", ratings=5000))
    users_k1 = rerun.model.users.count()
    assert _latest_counts(spark, root) == {"k1": users_k1}
    factors = lake.read_table(spark, str(root), S.USER_FACTORS).where("run_id = 'k1'")
    assert factors.count() == factors.select("user_id").distinct().count() == users_k1


@pytest.mark.parametrize("run_id", ["..", "../lake", "x" * 129])
def test_a_hostile_run_id_exits_2_and_every_earlier_run_stays_readable(spark, lake_with_runs, run_id):
    root, _ = lake_with_runs
    before = {t: lake.read_table(spark, str(root), t).count() for t in S.ALL_TABLES}
    latest = _latest_counts(spark, root)
    proc = subprocess.run(
        [sys.executable, "jobs/train.py", "--conf", "conf/local.yaml", "--set", f"output.root={root}", f"run.run_id={run_id}",
         f"run.checkpoint_dir={root}/_ck", "output.database=null"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: run.run_id:") and "safe run id" in proc.stderr
    assert {t: lake.read_table(spark, str(root), t).count() for t in S.ALL_TABLES} == before
    assert _latest_counts(spark, root) == latest


def test_gc_job_is_a_dry_run_by_default(lake_with_runs):
    root, _ = lake_with_runs
    proc = subprocess.run(
        [sys.executable, "jobs/gc.py", "--conf", "conf/local.yaml", "--keep", "1", "--set", f"output.root={root}",
         "output.database=null", "spark.master=local[1]"],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[dry run] delete run g1" in proc.stdout and "[dry run] delete run g3" in proc.stdout
    assert (root / S.USER_FACTORS / "run_id=g1").exists()


def test_gc_keeps_the_newest_succeeded_runs_and_clears_orphans(spark, lake_with_runs):
    root, _ = lake_with_runs
    orphan = Path(lake.staging_path(str(root), "dead"))
    orphan.mkdir(parents=True)
    # Checkpoints a run left (a succeeded run's are removed; these stand for a killed attempt's).
    leftover, kept = root / "_ck" / "g1" / "dsgd", root / "_ck" / "k1" / "dsgd"
    leftover.mkdir(parents=True)
    kept.mkdir(parents=True)
    plan = plan_gc(spark, str(root), keep=2, checkpoint_dir="unused: every run recorded its own")
    # g3 was rerun after g1 and g2 finished, so by finish time the newest two succeeded runs are g3 and k1.
    assert (plan.keep, plan.delete_runs, plan.orphaned_staging) == (["g3", "k1"], ["g1", "g2"], ["dead"])
    assert plan.checkpoints == {"g1": f"{root}/_ck/g1", "g2": f"{root}/_ck/g2"}
    assert plan_gc(spark, str(root), keep=0, checkpoint_dir="").keep == ["k1"]
    apply_gc(spark, str(root), plan, database=None)
    assert not leftover.parent.exists() and kept.exists()
    assert {r.run_id for r in lake.read_table(spark, str(root), S.RUNS).collect()} == {"g3", "k1"}
    assert lake.read_table(spark, str(root), S.USER_FACTORS).where(F.col("run_id").isin("g1", "g2")).count() == 0
    assert not orphan.exists()
    assert _latest_counts(spark, root).keys() == {"k1"}


def test_delta_output_fails_fast_without_the_jars(spark, tmp_path):
    if delta_available(spark):
        pytest.skip("Delta JARs are on the classpath here; this checks the message when they are not")
    with pytest.raises(ConfigError, match="output.format: delta needs the Delta Lake JARs"):
        Publisher(spark, load_config(None, [f"output.root={tmp_path}", "output.format=delta", "run.run_id=x"]))


def test_delta_round_trip_and_rerun(spark, tmp_path):
    if not delta_available(spark):
        pytest.skip("Delta Lake JARs are not on the classpath (no Maven Central here); runs where io.delta:delta-spark is")
    root = tmp_path / "lake"
    cfg = load_config(None, [f"output.root={root}", "output.format=delta", f"run.checkpoint_dir={root}/_ck", "run.run_id=d1",
                             "input.synthetic.ratings=3000", *TINY])
    first = run(spark, cfg)
    run(spark, cfg)
    factors = lake.read_table(spark, str(root), S.USER_FACTORS)
    assert factors.count() == first.model.users.count()
    assert _latest_counts(spark, root) == {"d1": first.model.users.count()}
