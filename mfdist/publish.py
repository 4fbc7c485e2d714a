"""Stage 7, publish: write a run's tables to the lake, with the ``runs`` row as the commit.

Each stage writes its tables straight into their ``run_id=<id>`` partition
(``<root>/<table>/run_id=<id>/``), so every byte is written once, also on
object stores where a rename is a copy. Readers of ``<table>_latest`` select
the newest *succeeded* run, and a run's ``runs`` row says ``running`` until
:meth:`Publisher.commit` rewrites it as ``succeeded`` after every table is
written: that row is the commit. A run killed at any point stays ``running``
(or ``failed``) and is never visible through ``_latest``; a rerun with the same
run_id first marks itself running, then removes that run's partitions and files.

``jobs/recommend.py`` replaces two tables of an already *succeeded* run, which
readers see; those are written to ``<root>/_staging/<run_id>/`` first and then
swapped in (:meth:`Publisher.replace`).
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Optional

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from mfdist import catalog, lake
from mfdist import schema as S
from mfdist.config import Config

log = logging.getLogger(__name__)

# Tables written at once by write_all: each write is a Spark job of its own.
WRITERS = 4


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
    """Writes a run's tables into their partitions; the run record is written first (running) and last (succeeded)."""

    spark: SparkSession
    cfg: Config
    written: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = self.cfg.output.root
        self.run_id = self.cfg.run.run_id
        self.fs = lake.FileSystem(self.spark, self.root)
        self.delta = self.cfg.output.format == "delta"
        if self.delta:
            lake.require_delta(self.spark, "output.format")

    def _write(self, table: str, df: DataFrame) -> None:
        """``df`` as this run's partition of ``table``, replacing that partition."""
        if self.delta:
            # Delta commits are atomic per table; replaceWhere swaps exactly this run's partition.
            df.withColumn(S.RUN_ID, F.lit(self.run_id)).write.format("delta").mode("overwrite") \
                .option("replaceWhere", f"{S.RUN_ID} = {catalog.sql_string(self.run_id)}") \
                .partitionBy(S.RUN_ID).save(lake.table_path(self.root, table))
        else:
            df.write.mode("overwrite").parquet(lake.partition_path(self.root, table, self.run_id))

    def _swap_in(self, table: str, df: DataFrame) -> None:
        """Replace this run's partition of ``table`` by ``df`` written elsewhere first (readers see old or new)."""
        if self.delta:
            self._write(table, df)
            return
        staged, dst = lake.staging_path(self.root, self.run_id, table), lake.partition_path(self.root, table, self.run_id)
        df.write.mode("overwrite").parquet(staged)
        self.fs.delete(dst)
        self.fs.mkdirs(lake.table_path(self.root, table))
        self.fs.rename(staged, dst)
        self.fs.delete(lake.staging_path(self.root, self.run_id))

    def _write_run_record(self, record: RunRecord, *, register: bool = True) -> None:
        """Replace this run's row in ``runs`` (swapped in, so a kill cannot leave half a row).

        ``register=False``: the partition is registered already and keeps its location, so the
        catalog only needs to forget this session's listing of its files.
        """
        self._swap_in(S.RUNS, self.spark.createDataFrame([record.row()], S.RUNS_SCHEMA).coalesce(1))
        database = self.cfg.output.database
        if database and register:
            catalog.register_run(self.spark, self.cfg, [S.RUNS])
        elif database:
            catalog.refresh(self.spark, database, S.RUNS)

    def begin(self, *, algorithm: str | None = None) -> RunRecord:
        """Record the run as ``running`` (``algorithm``: train.algorithm unless given), then clear what an
        earlier attempt of it left."""
        record = RunRecord(
            run_id=self.run_id,
            status="running",
            started_at=now(),
            algorithm=algorithm or self.cfg.train.algorithm,
            config=json.dumps(self.cfg.to_dict(), sort_keys=True),
        )
        self._write_run_record(record)
        if not self.delta:  # Delta's replaceWhere replaces each partition when it is written
            for table in S.RUN_TABLES:
                self.fs.delete(lake.partition_path(self.root, table, self.run_id))
        self.fs.delete(lake.run_files_path(self.root, self.run_id))
        self.fs.delete(lake.staging_path(self.root, self.run_id))
        return record

    def write(self, table: str, df: DataFrame) -> None:
        """Write ``df`` as this run's ``table`` (visible through ``_latest`` once the run commits)."""
        self._write(table, df)
        self.written.append(table)

    def write_all(self, tables: dict[str, DataFrame]) -> None:
        """Write independent ``tables`` as concurrent Spark jobs (small writes each leave most cores idle)."""
        with ThreadPoolExecutor(max_workers=WRITERS) as pool:
            for done in [pool.submit(self._write, table, df) for table, df in tables.items()]:
                done.result()
        self.written.extend(tables)

    def write_train_pairs(self, train: DataFrame) -> None:
        """The training split's (user_idx, item_idx) pairs, so jobs/recommend.py knows the seen items without the input."""
        train.select(S.USER_IDX, S.ITEM_IDX).write.mode("overwrite").parquet(lake.train_pairs_path(self.root, self.run_id))

    def write_report(self, files: dict[str, bytes]) -> None:
        """The run report's files, in ``<root>/_runs/<run_id>/report/``."""
        for name, data in files.items():
            self.fs.write_bytes(f"{lake.run_files_path(self.root, self.run_id, 'report')}/{name}", data)

    def commit(self, record: RunRecord) -> RunRecord:
        """Register the written partitions, then mark the run succeeded (last, so readers switch at once)."""
        if self.cfg.output.database:
            catalog.register_run(self.spark, self.cfg, self.written)
        done = replace(record, status="succeeded", finished_at=now())
        self._write_run_record(done, register=False)  # begin() registered it
        log.info("publish: committed %d tables for run %s under %s", len(self.written), self.run_id, self.root)
        return done

    def fail(self, record: RunRecord, error: BaseException) -> RunRecord:
        """Mark the run failed; its partial partitions stay hidden until a rerun or ``jobs/gc.py`` clears them."""
        failed = replace(record, status="failed", finished_at=now(), error=f"{type(error).__name__}: {error}"[:2000])
        self._write_run_record(failed)
        return failed

    def replace(self, tables: dict[str, DataFrame], *, registered_in: str | None) -> None:
        """Swap ``tables`` in as this (already published) run's partitions; its run record is kept.

        ``registered_in``: the database the run registered them in. The swap keeps each partition's
        location, so that catalog needs no change (and a local Derby metastore is never started).
        """
        for table, df in tables.items():
            self._swap_in(table, df)
        if self.cfg.output.database and self.cfg.output.database != registered_in:
            catalog.register_run(self.spark, self.cfg, list(tables))
        log.info("publish: replaced %s of run %s under %s", ", ".join(tables), self.run_id, self.root)


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
