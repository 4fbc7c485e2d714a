"""The cluster tier: the real job submitted to a Spark standalone cluster (master + two one-core workers on
127.0.0.1) whose executors lack mfdist, with the lake and checkpoints on viewfs:// (Hadoop-only).

Covered: the package reaches executors only through the zip on --py-files (numba kernel included); ALS and
DSGD end to end, top-N included, each with an executor JVM killed mid-training (ALS: the run succeeds; DSGD:
the factors equal those of an undisturbed run of the same job, done here in local mode); a DSGD driver killed
after a few epochs and resumed with the same run_id (the same factors again); driver-local paths refused.
"""

from __future__ import annotations

import re
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import functions as F

from mfdist import lake
from mfdist import schema as S
from mfdist.config import load_config
from mfdist.pipeline import run
from tests.cluster import REPO, StandaloneCluster

pytestmark = pytest.mark.cluster

TRAIN = REPO / "jobs" / "train.py"
SMALL = [
    "input.synthetic.users=2000", "input.synthetic.items=300", "input.synthetic.ratings=60000", "input.synthetic.rank=4",
    "train.rank=8", "train.bias_rounds=1", "output.top_n=10", "output.similar_items=5", "evaluate.k=10",
]
DSGD = ["train.algorithm=dsgd", "train.epochs=5", "train.step_size=0.1", "train.reg=0.05"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    started = StandaloneCluster(tmp_path_factory.mktemp("cluster")).start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """The local folder behind the cluster's viewfs://tier mount (its lake/ and ck/)."""
    folder = tmp_path_factory.mktemp("shared")
    (folder / "lake").mkdir()
    (folder / "ck").mkdir()
    return folder


@pytest.fixture
def work(tmp_path) -> Path:
    """The driver's working directory: empty, so nothing can rely on the checkout being there."""
    return tmp_path


def job(shared: Path, run_id: str, *extra: str) -> list[str]:
    """jobs/train.py's arguments: conf/local.yaml on the tier's small data, the lake and checkpoints on viewfs://."""
    mount = "spark.conf.spark.hadoop.fs.viewfs.mounttable.tier.link."
    return [
        "--conf", str(REPO / "conf" / "local.yaml"), "--set",
        "output.root=viewfs://tier/lake", "run.checkpoint_dir=viewfs://tier/ck",
        f"{mount}/lake={(shared / 'lake').as_uri()}", f"{mount}/ck={(shared / 'ck').as_uri()}",
        "spark.conf.spark.sql.catalogImplementation=in-memory", "spark.conf.spark.sql.shuffle.partitions=4",
        "output.database=null", f"run.run_id={run_id}", *SMALL, *extra,
    ]


def _factors(spark, shared: Path, run_id: str) -> np.ndarray:
    pdf = spark.read.parquet(lake.partition_path(str(shared / "lake"), S.USER_FACTORS, run_id)).toPandas().sort_values(S.USER_IDX)
    return np.column_stack([pdf[S.USER_IDX], pdf[S.BIAS], np.stack(pdf[S.FACTORS].to_numpy())])


def _check_published(spark, shared: Path, run_id: str, algorithm: str) -> None:
    root = str(shared / "lake")
    run = lake.read_partition(spark, root, S.RUNS, run_id).first()
    assert (run.status, run.algorithm) == ("succeeded", algorithm)
    assert run.input_rows == run.accepted_rows > 45000  # 60k draws, repeated pairs dropped
    users = lake.read_partition(spark, root, S.USER_FACTORS, run_id).count()
    assert users > 1950
    recs = lake.read_partition(spark, root, S.RECOMMENDATIONS, run_id)
    assert recs.count() == 10 * users and recs.agg(F.max("rank")).first()[0] == 10
    assert lake.read_partition(spark, root, S.SIMILAR_ITEMS, run_id).count() == 5 * 300
    metrics = {(r.stage, r.metric): r.value for r in lake.read_partition(spark, root, S.METRICS, run_id).collect()}
    assert metrics[("evaluate", "rmse")] < 1.0 and ("evaluate", "ndcg@10") in metrics
    assert not (shared / "ck" / run_id).exists()  # a succeeded run's checkpoints are removed


def _succeeds(submission, timeout: float = 600) -> str:
    rc = submission.wait(timeout)
    assert rc == 0, submission.output()[-4000:]
    return submission.output()


def test_executors_get_mfdist_only_from_the_zip(cluster, work):
    probe = work / "probe.py"
    probe.write_text(textwrap.dedent("""
        import sys
        import numpy as np
        from pyspark.sql import SparkSession

        sc = SparkSession.builder.getOrCreate().sparkContext

        def kernel_in_a_task(_):
            import mfdist
            from mfdist.train.dsgd import kernel as K
            block = K.layout_block(np.array([0, 1]), np.array([1, 0]), np.array([4.0, 2.0]), rank=2, seed=1)
            side = lambda: K.Side(np.full((2, 2), 0.1, np.float32), np.zeros(2, np.float32), np.zeros(2, np.float32),
                                  np.zeros(2, np.float32), np.ones(2, np.float32))
            errors = K.sgd_block(block, np.arange(block.n_sub), side(), side(), mu=3.0, lr=0.1, biases=True, rating_range=(1.0, 5.0))
            return f"{mfdist.__file__} {errors.count}"

        try:
            sc.parallelize([0], 1).map(kernel_in_a_task).collect()
            print("without the zip: imported")
        except Exception as exc:
            print("without the zip:", "no module" if "No module named 'mfdist'" in str(exc) else str(exc)[:300])
        sc.addPyFile(sys.argv[1])
        print("with the zip:", sc.parallelize([0], 1).map(kernel_in_a_task).collect()[0])
    """))
    out = _succeeds(cluster.submit(probe, str(cluster.zip), cwd=work, name="probe", py_files=False), timeout=300)
    assert "without the zip: no module" in out
    [line] = [line for line in out.splitlines() if line.startswith("with the zip:")]
    # Imported from the executor's own copy of the zip, with the numba kernel working there.
    assert line.endswith("mfdist.zip/mfdist/__init__.py 2") and str(cluster.zip) not in line


def test_als_end_to_end_survives_an_executor_loss(cluster, shared, work, spark):
    submitted = cluster.submit(TRAIN, *job(shared, "als-1", "train.algorithm=als", "train.epochs=5"), cwd=work, name="als")
    submitted.wait_for(r"train: started", timeout=300)
    time.sleep(3)
    cluster.kill_an_executor()
    _succeeds(submitted)
    _check_published(spark, shared, "als-1", "als")


@pytest.fixture(scope="module")
def dsgd_reference(spark, tmp_path_factory) -> np.ndarray:
    """The user factors of an undisturbed run of the same DSGD job (d = 2), in this process's local session."""
    root = tmp_path_factory.mktemp("dsgd-reference")
    overrides = job(root, "dsgd-ref", *DSGD)[3:] + [f"output.root={root}/lake", f"run.checkpoint_dir={root}/ck"]
    result = run(spark, load_config(str(REPO / "conf" / "local.yaml"), overrides))
    assert result.record.status == "succeeded"
    return _factors(spark, root, "dsgd-ref")


def test_dsgd_survives_an_executor_loss_then_a_killed_driver_and_resumes_with_the_same_factors(
    cluster, shared, work, spark, dsgd_reference
):
    # One job pays for both faults: an executor dies after epoch 2, the driver after epoch 3.
    first = cluster.submit(TRAIN, *job(shared, "dsgd-resume", *DSGD), cwd=work, name="dsgd-first")
    first.wait_for(r"train epoch 2:", timeout=300)
    killed = cluster.kill_an_executor()
    first.wait_for(r"train epoch 3:", timeout=300)
    first.kill()
    assert killed not in cluster.executor_pids()
    assert lake.read_partition(spark, str(shared / "lake"), S.RUNS, "dsgd-resume").first().status == "running"
    out = _succeeds(cluster.submit(TRAIN, *job(shared, "dsgd-resume", *DSGD), cwd=work, name="dsgd-again"))
    # The driver died at epoch 3's log line, so the checkpoint of epoch 3 (or of 4, had it finished first) is resumed.
    assert re.search(r"resuming after epoch [34]\b", out) and "train epoch 1:" not in out
    assert "dsgd: d=2 " in out and "train epoch 5:" in out
    _check_published(spark, shared, "dsgd-resume", "dsgd")
    np.testing.assert_allclose(_factors(spark, shared, "dsgd-resume"), dsgd_reference, atol=1e-4)


def test_a_driver_local_lake_is_a_config_error_on_a_cluster(cluster, shared, work):
    submitted = cluster.submit(TRAIN, *job(shared, "local-root", "output.root=./lake"), cwd=work, name="local-root")
    assert submitted.wait(300) == 2
    assert "output.root: ./lake is a relative path" in submitted.output() and "shared storage" in submitted.output()
    assert not (work / "lake").exists()
