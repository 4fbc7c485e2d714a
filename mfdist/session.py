"""The SparkSession from the `spark` config section, and the checks that need it (master, shared storage)."""

from __future__ import annotations

import logging
import os
import subprocess
from contextlib import contextmanager
from typing import Iterator, Optional
from urllib.parse import urlsplit

from pyspark import SparkContext
from pyspark.sql import SparkSession

from mfdist import jvm, lake
from mfdist.catalog import local_catalog_conf
from mfdist.config import Config
from mfdist.errors import ConfigError

log = logging.getLogger(__name__)

# Partition values such as run_id=20261122 must stay strings, whatever they look like.
_FIXED_CONF = {"spark.sql.sources.partitionColumnTypeInference.enabled": "false"}
_SIMPLIFIED_TRACEBACK = "spark.sql.execution.pyspark.udf.simplifiedTraceback.enabled"


def launched_by_spark_submit() -> bool:
    """Whether this driver was started by spark-submit (its JVM, with its --master, already runs)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def build_session(cfg: Config) -> SparkSession:
    """Create (or reuse) the session with `spark.master` and `spark.conf` applied, and check its storage.

    ``spark.master`` from the config applies to ``python jobs/...``; under spark-submit its
    ``--master`` wins, so ``spark-submit --master spark://... jobs/train.py --conf conf/local.yaml``
    runs on that cluster.
    """
    return _build(cfg, dump=False)[0]


@contextmanager
def job_session(cfg: Config) -> Iterator[SparkSession]:
    """A job's session (``jobs/*.py``), stopped when the job ends.

    The first local job on a machine leaves the class-data archive later local jobs start
    from (:mod:`mfdist.jvm`), once its JVM has exited.
    """
    spark, archive = _build(cfg, dump=True)
    try:
        yield spark
    finally:
        _stop(spark, archive)


def _build(cfg: Config, *, dump: bool) -> tuple[SparkSession, Optional[jvm.Archive]]:
    builder = SparkSession.builder.appName(cfg.run.name)
    if cfg.spark.master and not launched_by_spark_submit():
        builder = builder.master(cfg.spark.master)
    conf = {**local_worker_conf(cfg), **cfg.spark.conf, **local_catalog_conf(cfg), **_FIXED_CONF}
    conf = {**one_worker_pool(conf), **conf}
    # Only a JVM this call starts takes the options (a session reuses a running one, also after a stop).
    starts_jvm = SparkContext._gateway is None and starts_local_jvm(cfg)
    archive = jvm.plan_archive(conf, dump=dump) if starts_jvm else None
    for key, value in jvm.with_archive(conf, archive).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    log.info("spark: master %s", master(spark))
    try:
        check_shared_storage(spark, cfg)
    except ConfigError:
        _stop(spark, archive)
        raise
    return spark, archive


def _stop(spark: SparkSession, archive: Optional[jvm.Archive]) -> None:
    """Stop the session; a JVM dumping the archive is also ended (and waited for), so the dump is complete."""
    if archive is None or archive.dumping is None:
        spark.stop()
        return
    gateway = spark.sparkContext._gateway
    spark.stop()
    jvm.finish_dump(archive, jvm_exited=_end_jvm(gateway))


def _end_jvm(gateway) -> bool:
    """Close the JVM's stdin (PySpark's gateway exits on EOF, dumping the archive) and wait for it: whether it exited cleanly."""
    proc = getattr(gateway, "proc", None)
    if proc is None or proc.stdin is None:
        return False
    gateway.close()
    SparkContext._gateway = SparkContext._jvm = None  # a later session in this process starts a new JVM
    proc.stdin.close()
    try:
        return proc.wait(timeout=600) == 0
    except subprocess.TimeoutExpired:
        return False


def starts_local_jvm(cfg: Config) -> bool:
    """Whether this process starts the JVM itself, for a local master (not spark-submit's, not a cluster's)."""
    return not launched_by_spark_submit() and (cfg.spark.master or "").startswith("local")


def local_worker_conf(cfg: Config) -> dict[str, str]:
    """On a local master this process starts: Python workers forked from :mod:`mfdist.daemon` (the kernel loaded).

    Only there is mfdist importable by the daemon itself; on a cluster the package reaches the
    workers as ``--py-files``, which Spark puts on a task's path, not on its daemon's.
    """
    return {"spark.python.daemon.module": "mfdist.daemon"} if starts_local_jvm(cfg) else {}


def one_worker_pool(conf: dict[str, str]) -> dict[str, str]:
    """The executor environment that lets RDD tasks and SQL's Python UDFs share one daemon and its workers.

    Spark keeps a daemon (and its pool of forked workers) per distinct worker environment, and
    its Arrow and pandas UDF runners add SPARK_SIMPLIFIED_TRACEBACK=1 to theirs: a DSGD fit ran
    two daemons, each paying the imports and every worker start once more.
    """
    if str(conf.get(_SIMPLIFIED_TRACEBACK, "true")).lower() == "false":
        return {}
    return {"spark.executorEnv.SPARK_SIMPLIFIED_TRACEBACK": "1"}


def master(spark: SparkSession) -> str:
    return spark.conf.get("spark.master", "local[*]")


def is_local(spark: SparkSession) -> bool:
    return master(spark).startswith("local")


def storage_paths(cfg: Config) -> list[tuple[str, str]]:
    """(key, path) of every config value that tasks or the driver read or write as a file path."""
    paths = [("output.root", cfg.output.root), ("run.checkpoint_dir", cfg.run.checkpoint_dir)]
    if cfg.input.path and cfg.input.format not in ("synthetic", "table"):
        paths.append(("input.path", cfg.input.path))
    if cfg.split.method == "file" and cfg.split.test_path:
        paths.append(("split.test_path", cfg.split.test_path))
    return paths


def check_shared_storage(spark: SparkSession, cfg: Config) -> None:
    """On a non-local master, raise ConfigError for a relative or driver-local path in the config.

    A URI with a scheme (s3a://, hdfs://, dbfs:/, file:/// on a shared mount ...) is taken as
    shared; a bare path is shared only when Hadoop's default file system is (HDFS on EMR, DBFS).
    """
    if is_local(spark):
        return
    for key, path in storage_paths(cfg):
        if urlsplit(path).scheme:
            continue
        if not path.startswith("/"):
            problem = "a relative path (resolved against the driver's working directory)"
        elif lake.FileSystem(spark, path).qualify(path).startswith("file:"):
            problem = "a path on the driver's local disk (Hadoop's default file system is file:)"
        else:
            continue
        raise ConfigError(
            f"{key}: {path} is {problem}, but spark.master is {master(spark)}: executors on other hosts need "
            "shared storage; use a URI they all reach (s3a://, abfss://, gs://, hdfs://, dbfs:/, or file:/// on a shared mount)"
        )


def task_slots(spark: SparkSession) -> int:
    """Tasks the cluster runs at once (executors x cores / spark.task.cpus), as Spark's scheduler counts them.

    ``defaultParallelism`` is that number only while ``spark.default.parallelism`` is unset, and
    clusters set it for shuffles (thousands); Spark has no public API for the slots.
    """
    sc = spark.sparkContext._jsc.sc()
    return max(1, int(sc.maxNumConcurrentTasks(sc.resourceProfileManager().defaultResourceProfile())))


def release_cached(spark: SparkSession) -> None:
    """Drop every cached DataFrame and persisted RDD (MLlib's ALS factor blocks included)."""
    spark.catalog.clearCache()
    for rdd in spark.sparkContext._jsc.getPersistentRDDs().values():
        rdd.unpersist(False)
