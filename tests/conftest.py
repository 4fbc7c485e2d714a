"""One session-scoped local SparkSession for the whole suite (never stopped by tests)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from pyspark.sql import SparkSession

from mfdist.config import Config, load_config
from mfdist.pipeline import RunResult, run
from mfdist.session import release_cached

REPO = Path(__file__).resolve().parents[1]
ML100K = (REPO / ".." / "shared" / "data" / "ml-100k").resolve()

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)


# A Hadoop-only file system for the storage-layer tests: viewfs://mfdist/data/... is a mount of a
# local folder that Hadoop serves without extra JARs and pyarrow cannot open.
VIEWFS = "viewfs://mfdist/data"


@pytest.fixture(scope="session", autouse=True)
def _jvm_cache(tmp_path_factory: pytest.TempPathFactory):
    """The local jobs the tests start keep their class-data archive (mfdist.jvm) here, not in the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def viewfs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The local folder behind ``VIEWFS``."""
    return tmp_path_factory.mktemp("viewfs")


@pytest.fixture(scope="session")
def spark(tmp_path_factory: pytest.TempPathFactory, viewfs_dir: Path) -> SparkSession:
    local_dir = tmp_path_factory.mktemp("spark-local")
    session = (
        SparkSession.builder.master("local[2]")
        .appName("mfdist-tests")
        .config("spark.sql.shuffle.partitions", "2")
        # Adaptive execution re-plans every shuffle; on this suite's tiny data that costs several times the
        # work (a tiny run: 49 s with it, 18 s without). The subprocess and cluster-tier jobs keep Spark's default.
        .config("spark.sql.adaptive.enabled", "false")
        .config("spark.default.parallelism", "2")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.local.dir", str(local_dir))
        .config("spark.driver.memory", "4g")
        .config("spark.sql.sources.partitionColumnTypeInference.enabled", "false")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        # As mfdist.session.build_session does for local masters: workers fork with the DSGD kernel loaded.
        .config("spark.python.daemon.module", "mfdist.daemon")
        # As mfdist.session.one_worker_pool does: RDD tasks and SQL's Python UDFs share that daemon.
        .config("spark.executorEnv.SPARK_SIMPLIFIED_TRACEBACK", "1")
        # The status store keeps plans and task data of past jobs even with the UI off; a
        # long suite in one JVM would fill the heap with them.
        .config("spark.sql.ui.retainedExecutions", "20")
        .config("spark.ui.retainedJobs", "50")
        .config("spark.ui.retainedStages", "50")
        .config("spark.ui.retainedTasks", "2000")
        .config("spark.ui.dagGraph.retainedRootRDDs", "50")
        .config("spark.hadoop.fs.viewfs.mounttable.mfdist.link./data", viewfs_dir.as_uri())
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    session.sparkContext.setCheckpointDir(str(tmp_path_factory.mktemp("checkpoints")))
    return session


@pytest.fixture(scope="module", autouse=True)
def _release_cached_data():
    """Drop what a test module cached (DataFrames and MLlib's persisted RDDs) when it ends."""
    yield
    session = SparkSession.getActiveSession()
    if session is not None:
        release_cached(session)


@pytest.fixture(scope="session")
def ml100k() -> Path:
    if not (ML100K / "u1.base").is_file():
        pytest.skip(f"MovieLens 100k not found at {ML100K}")
    return ML100K


TINY = [
    "input.synthetic.users=300", "input.synthetic.items=80", "input.synthetic.ratings=6000", "input.synthetic.rank=3",
    "train.rank=4", "train.epochs=4", "train.bias_rounds=1", "output.top_n=5", "output.similar_items=3", "evaluate.k=4",
]


def tiny_config(tmp_path, *extra: str, run_id: str = "r1") -> Config:
    """The tiny synthetic job under ``tmp_path`` (lake and checkpoints), with ``extra`` overrides."""
    return load_config(
        None,
        [f"output.root={tmp_path}/lake", f"run.checkpoint_dir={tmp_path}/ck", f"run.run_id={run_id}", *TINY, *extra],
    )


@pytest.fixture(scope="session")
def tiny_run(spark, tmp_path_factory) -> tuple[Config, RunResult]:
    """One tiny job run (run_id r1), shared by the modules that only read what it published."""
    cfg = tiny_config(tmp_path_factory.mktemp("tiny"))
    return cfg, run(spark, cfg)
