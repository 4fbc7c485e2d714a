"""Stage 7, publish: write a run's tables to the lake atomically.

A run writes every table to ``<root>/_staging/<run_id>/<table>/`` first. Only
when all are written does :meth:`Publisher.commit` move them into place as the
``run_id=<id>`` partition of each table (replacing that run's earlier partial
output, so a rerun with the same run_id is idempotent) and then mark the run
``succeeded`` in ``runs``. Readers of ``<table>_latest`` select the newest
succeeded run, so a run killed at any point is never visible to them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Optional

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from mfdist import catalog, lake
from mfdist import schema as S
from mfdist.config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    status: str
    started_at: datetime
    algorithm: str
    config: str
    finished_at: Optional[datetime] = None
    input_rows: Optional[int] = None
    accepted_rows: Optional[int] = None
    rejected_rows: Optional[int] = None
    error: Optional[str] = None

    def row(self) -> tuple:
        return tuple(getattr(self, f.name) for f in S.RUNS_SCHEMA.fields)


def now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


@dataclass
class Publisher:
    """Stages a run's tables and commits them together; the run record is written last."""

    spark: SparkSession
    cfg: Config
    staged: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = self.cfg.output.root
        self.run_id = self.cfg.run.run_id
        self.fs = lake.FileSystem(self.spark, self.root)
        self.delta = self.cfg.output.format == "delta"
        if self.delta:
            lake.require_delta(self.spark, "output.format")

    def _staging(self, name: str) -> str:
        return lake.staging_path(self.root, self.run_id, name)

    def _publish(self, table: str) -> None:
        """Make the staged ``table`` this run's partition, replacing an earlier attempt's."""
        src, dst = self._staging(table), lake.partition_path(self.root, table, self.run_id)
        if self.delta:
            # Delta commits are atomic per table; replaceWhere swaps exactly this run's partition.
            staged = self.spark.read.parquet(src).withColumn(S.RUN_ID, F.lit(self.run_id))
            staged.write.format("delta").mode("overwrite").option("replaceWhere", f"{S.RUN_ID} = '{self.run_id}'") \
                .partitionBy(S.RUN_ID).save(lake.table_path(self.root, table))
            return
        self._move(src, dst)

    def _move(self, src: str, dst: str) -> None:
        self.fs.delete(dst)
        self.fs.mkdirs(dst.rsplit("/", 1)[0])
        self.fs.rename(src, dst)

    def _write_run_record(self, record: RunRecord) -> None:
        """Replace this run's row in ``runs`` (staged first, so a kill cannot leave half a row)."""
        self.spark.createDataFrame([record.row()], S.RUNS_SCHEMA).coalesce(1).write.mode("overwrite").parquet(
            self._staging(S.RUNS)
        )
        self._publish(S.RUNS)
        if self.cfg.output.database:
            catalog.register_run(self.spark, self.cfg, [S.RUNS])

    def begin(self) -> RunRecord:
        """Record the run as ``running`` and clear staging left by an earlier attempt of it."""
        self.fs.delete(lake.staging_path(self.root, self.run_id))
        record = RunRecord(
            run_id=self.run_id,
            status="running",
            started_at=now(),
            algorithm=self.cfg.train.algorithm,
            config=json.dumps(self.cfg.to_dict(), sort_keys=True),
        )
        self._write_run_record(record)
        return record

    def stage(self, table: str, df: DataFrame) -> None:
        """Write ``df`` as this run's ``table`` to staging (not yet visible)."""
        df.write.mode("overwrite").parquet(self._staging(table))
        self.staged.append(table)

    def stage_report(self, files: dict[str, bytes]) -> None:
        """Stage the run report's files; commit moves them to ``<root>/_runs/<run_id>/report/``."""
        for name, data in files.items():
            self.fs.write_bytes(f"{self._staging('_report')}/{name}", data)

    def _commit_staged(self) -> None:
        for table in self.staged:
            self._publish(table)
        if self.cfg.output.database:
            catalog.register_run(self.spark, self.cfg, self.staged)

    def commit(self, record: RunRecord) -> RunRecord:
        """Publish every staged table and file, then mark the run succeeded (last, so readers switch at once)."""
        self._commit_staged()
        if self.fs.exists(self._staging("_report")):
            self._move(self._staging("_report"), lake.run_files_path(self.root, self.run_id, "report"))
        done = replace(record, status="succeeded", finished_at=now())
        self._write_run_record(done)
        self.fs.delete(lake.staging_path(self.root, self.run_id))
        log.info("publish: committed %d tables for run %s under %s", len(self.staged), self.run_id, self.root)
        return done

    def fail(self, record: RunRecord, error: BaseException) -> RunRecord:
        """Mark the run failed; its staged data is left for ``jobs/gc.py`` or a rerun to clear."""
        failed = replace(record, status="failed", finished_at=now(), error=f"{type(error).__name__}: {error}"[:2000])
        self._write_run_record(failed)
        return failed

    def replace_staged(self) -> None:
        """Swap the staged tables in as this (already published) run's partitions; its run record is kept."""
        self._commit_staged()
        self.fs.delete(lake.staging_path(self.root, self.run_id))
        log.info("publish: replaced %s of run %s under %s", ", ".join(self.staged), self.run_id, self.root)


def factor_table(model_side: DataFrame, index: DataFrame, *, idx_col: str, refined: DataFrame | None = None) -> DataFrame:
    """Published factors: original id, index, bias, factors, refined (rows with trained factors only).

    ``refined`` holds the ``idx_col`` values of the rows the refine stage replaced (broadcast-sized);
    None when refine is off or rejected, so every row is ``refined = false``.
    """
    id_col = index.columns[0] if index.columns[0] != idx_col else index.columns[1]
    table = index.join(model_side, idx_col, "inner")
    flag = F.lit(False)
    if refined is not None:
        table = table.join(F.broadcast(refined.select(idx_col, F.lit(True).alias(S.REFINED))), idx_col, "left")
        flag = F.coalesce(F.col(S.REFINED), F.lit(False))
    return table.select(id_col, idx_col, S.BIAS, S.FACTORS, flag.alias(S.REFINED))


def metrics_frame(spark: SparkSession, rows: list[tuple[str, str, float]]) -> DataFrame:
    return spark.createDataFrame([(s, m, float(v)) for s, m, v in rows], S.METRICS_SCHEMA)


def epochs_frame(spark: SparkSession, rows: list[tuple]) -> DataFrame:
    return spark.createDataFrame(rows, S.EPOCHS_SCHEMA)
