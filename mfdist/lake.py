"""The data-lake layout under ``output.root`` and file-system operations through Hadoop's FileSystem.

Layout::

    <root>/<table>/run_id=<id>/part-*.parquet   a run's partition of each table
    <root>/runs/run_id=<id>/                     the run record: running, then succeeded (the commit)
    <root>/_runs/<id>/report/                    the run report (metrics.json, loss curve, report.md)
    <root>/_runs/<id>/artifacts/                 files a stage keeps (the refine MLP head)
    <root>/_runs/<id>/train_pairs/               the training split's (user_idx, item_idx): the seen items
    <root>/_staging/<id>/<table>/                a replacement of a published partition before the swap

With ``output.format: delta`` the tables are Delta tables partitioned by run_id
at the same paths (``_delta_log`` beside the partitions); staging stays Parquet.
Names starting with ``_`` are ignored by Spark's partition discovery.

Going through Hadoop's FileSystem (not ``os``) keeps the same code working on
HDFS, S3A, ABFS and GCS as on a local disk.
"""

from __future__ import annotations

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from mfdist import schema as S
from mfdist.errors import ConfigError

STAGING = "_staging"


def table_path(root: str, table: str) -> str:
    return f"{root.rstrip('/')}/{table}"


def partition_path(root: str, table: str, run_id: str) -> str:
    return f"{table_path(root, table)}/{S.RUN_ID}={run_id}"


def run_files_path(root: str, run_id: str, kind: str | None = None) -> str:
    """Where a run's non-table files go: ``kind`` is ``report``, ``artifacts`` or ``train_pairs`` (None: the run's folder)."""
    base = f"{root.rstrip('/')}/_runs/{run_id}"
    return f"{base}/{kind}" if kind else base


def staging_path(root: str, run_id: str, table: str | None = None) -> str:
    base = f"{root.rstrip('/')}/{STAGING}/{run_id}"
    return f"{base}/{table}" if table else base


def checkpoint_path(checkpoint_dir: str, run_id: str) -> str:
    """A run's checkpoints (DSGD's factor blocks and state, ALS's RDD checkpoints): removed when it succeeds."""
    return f"{checkpoint_dir.rstrip('/')}/{run_id}"


def artifacts_path(root: str, run_id: str) -> str:
    return run_files_path(root, run_id, "artifacts")


def train_pairs_path(root: str, run_id: str) -> str:
    """The run's training (user_idx, item_idx) pairs as Parquet: jobs/recommend.py's seen items."""
    return run_files_path(root, run_id, "train_pairs")


class FileSystem:
    """The few Hadoop FileSystem calls the publisher needs, for any scheme."""

    def __init__(self, spark: SparkSession, path: str):
        jvm = spark.sparkContext._jvm
        self._jvm = jvm
        self._fs = jvm.org.apache.hadoop.fs.Path(path).getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())

    def _path(self, path: str):
        return self._jvm.org.apache.hadoop.fs.Path(path)

    def exists(self, path: str) -> bool:
        return bool(self._fs.exists(self._path(path)))

    def is_dir(self, path: str) -> bool:
        return bool(self._fs.isDirectory(self._path(path)))

    def is_file(self, path: str) -> bool:
        return bool(self._fs.isFile(self._path(path)))

    def delete(self, path: str) -> bool:
        return bool(self._fs.delete(self._path(path), True))

    def mkdirs(self, path: str) -> None:
        self._fs.mkdirs(self._path(path))

    def rename(self, src: str, dst: str) -> None:
        if not self._fs.rename(self._path(src), self._path(dst)):
            raise OSError(f"could not rename {src} to {dst}")

    def copy_from_local(self, local: str, dst: str) -> None:
        """Copy a driver-local file to ``dst`` (overwriting), whatever the scheme of ``dst``."""
        self._fs.copyFromLocalFile(False, True, self._path(local), self._path(dst))

    def qualify(self, path: str) -> str:
        """The absolute URI of ``path`` (file:/..., s3a://...), as catalogs want locations."""
        return str(self._fs.makeQualified(self._path(path)).toString())

    def write_bytes(self, path: str, data: bytes) -> None:
        stream = self._fs.create(self._path(path), True)
        try:
            stream.write(bytearray(data))
        finally:
            stream.close()

    def read_bytes(self, path: str) -> bytes:
        stream = self._fs.open(self._path(path))
        try:
            return bytes(self._jvm.org.apache.commons.io.IOUtils.toByteArray(stream))
        finally:
            stream.close()

    def list_dirs(self, path: str) -> list[str]:
        """Names of the sub-directories of ``path`` (empty when it does not exist)."""
        return self._list(path, dirs=True)

    def list_files(self, path: str) -> list[str]:
        """Names of the files in ``path`` (empty when it does not exist)."""
        return self._list(path, dirs=False)

    def _list(self, path: str, *, dirs: bool) -> list[str]:
        if not self.exists(path):
            return []
        return [s.getPath().getName() for s in self._fs.listStatus(self._path(path)) if bool(s.isDirectory()) == dirs]


def read_table(spark: SparkSession, root: str, table: str) -> DataFrame | None:
    """All committed partitions of ``table`` (with run_id), or None when it has none."""
    path = table_path(root, table)
    fs = FileSystem(spark, path)
    if fs.exists(f"{path}/_delta_log"):
        return spark.read.format("delta").load(path)
    if not any(d.startswith(f"{S.RUN_ID}=") for d in fs.list_dirs(path)):
        return None
    return spark.read.option("basePath", path).parquet(path)


def read_partition(spark: SparkSession, root: str, table: str, run_id: str) -> DataFrame:
    """One run's committed partition of ``table`` (without the run_id column)."""
    path = table_path(root, table)
    if FileSystem(spark, path).exists(f"{path}/_delta_log"):
        return spark.read.format("delta").load(path).where(F.col(S.RUN_ID) == run_id).drop(S.RUN_ID)
    return spark.read.parquet(partition_path(root, table, run_id))


def runs_by_status(spark: SparkSession, root: str, status: str = "succeeded") -> DataFrame | None:
    """Runs with ``status``, newest finished first."""
    runs = read_table(spark, root, S.RUNS)
    if runs is None:
        return None
    return runs.where(F.col("status") == status).orderBy(F.col("finished_at").desc(), F.col(S.RUN_ID).desc())


def latest_succeeded_run(spark: SparkSession, root: str, *, exclude: str | None = None) -> str | None:
    """The run_id of the newest succeeded run under ``root`` (a bounded, one-row action)."""
    runs = runs_by_status(spark, root)
    if runs is None:
        return None
    if exclude is not None:
        runs = runs.where(F.col(S.RUN_ID) != exclude)
    row = runs.select(S.RUN_ID).first()
    return row[0] if row else None


def delta_available(spark: SparkSession) -> bool:
    """Whether the Delta Lake classes are on the JVM classpath."""
    try:
        spark.sparkContext._jvm.java.lang.Class.forName("io.delta.tables.DeltaTable")
        return True
    except Exception:  # py4j wraps the ClassNotFoundException
        return False


def require_delta(spark: SparkSession, key: str) -> None:
    """Fail fast, naming ``key``, when Delta is asked for but its JARs are missing."""
    if not delta_available(spark):
        raise ConfigError(
            f"{key}: delta needs the Delta Lake JARs on the classpath (io.delta:delta-spark; built in on "
            "Databricks and EMR with Delta enabled); use parquet here or add the package to spark.jars.packages"
        )
