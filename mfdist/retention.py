"""Retention for ``jobs/gc.py``: drop runs older than the newest N succeeded ones, and orphaned staging.

The plan is computed from the ``runs`` table (one row per run, so a bounded
collect) and printed before anything is deleted; the newest succeeded run is
always kept, and a ``running`` run is never touched unless it started before
every kept run (then it is a dead run that will not come back).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from pyspark.sql import SparkSession

from mfdist import catalog, lake
from mfdist import schema as S
from mfdist.config import check_run_id
from mfdist.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GcPlan:
    keep: list[str]
    delete_runs: list[str]
    orphaned_staging: list[str]
    checkpoints: dict[str, str] = field(default_factory=dict)  # run_id -> its checkpoint folder, for delete_runs

    def describe(self, root: str) -> list[str]:
        lines = [f"keep run {r}" for r in self.keep]
        lines += [
            f"delete run {r}: every table's {S.RUN_ID}={r} partition, {lake.run_files_path(root, r, '*')} and {self.checkpoints[r]}"
            for r in self.delete_runs
        ]
        lines += [f"delete staging {lake.staging_path(root, r)}" for r in self.orphaned_staging]
        return lines


def _checkpoint_dir(config_json: str | None, default: str) -> str:
    """The run.checkpoint_dir a run recorded in its config (``default`` when it recorded none)."""
    recorded = json.loads(config_json).get("run", {}).get("checkpoint_dir") if config_json else None
    return recorded or default


def _safe(run_id: str) -> bool:
    try:
        check_run_id(run_id, key=f"{S.RUNS}.{S.RUN_ID}")
    except ConfigError as exc:
        log.warning("gc: leaving %s alone: %s", run_id, exc)
        return False
    return True


def plan_gc(spark: SparkSession, root: str, *, keep: int, checkpoint_dir: str) -> GcPlan:
    """What to delete so that only runs from the newest ``keep`` (>= 1) succeeded ones on remain.

    A deleted run's checkpoints are found under the ``run.checkpoint_dir`` it recorded
    (``checkpoint_dir`` for runs that recorded none).
    """
    runs_df = lake.read_table(spark, root, S.RUNS)
    columns = (S.RUN_ID, "status", "started_at", "finished_at", "config")
    runs = [] if runs_df is None else [r for r in runs_df.select(*columns).collect() if _safe(r[S.RUN_ID])]
    succeeded = sorted((r for r in runs if r.status == "succeeded"), key=lambda r: (r.finished_at, r[S.RUN_ID]), reverse=True)
    kept = succeeded[: max(keep, 1)]
    if not kept:
        return GcPlan([], [], [])
    oldest_kept = min(r.started_at for r in kept)
    kept_ids = {r[S.RUN_ID] for r in kept}
    delete = sorted(r[S.RUN_ID] for r in runs if r[S.RUN_ID] not in kept_ids and r.started_at < oldest_kept)
    live = {r[S.RUN_ID] for r in runs if r.status == "running"} - set(delete)
    staging_root = f"{root.rstrip('/')}/{lake.STAGING}"
    orphans = sorted(d for d in lake.FileSystem(spark, staging_root).list_dirs(staging_root) if d not in live and _safe(d))
    configs = {r[S.RUN_ID]: r.config for r in runs}
    folders = {r: lake.checkpoint_path(_checkpoint_dir(configs[r], checkpoint_dir), r) for r in delete}
    return GcPlan(sorted(kept_ids), delete, orphans, folders)


def _delete_partition(spark: SparkSession, fs: lake.FileSystem, root: str, table: str, run_id: str) -> None:
    path = lake.table_path(root, table)
    if fs.exists(f"{path}/_delta_log"):
        spark.sql(f"DELETE FROM delta.{catalog.quote_part(path)} WHERE {S.RUN_ID} = {catalog.sql_string(run_id)}")
    else:
        fs.delete(lake.partition_path(root, table, run_id))


def apply_gc(spark: SparkSession, root: str, plan: GcPlan, *, database: str | None) -> None:
    """Delete what ``plan`` lists; a run's ``runs`` row goes last so a crash leaves it visible to a retry."""
    fs = lake.FileSystem(spark, root)
    for run_id in plan.delete_runs:
        for table in S.RUN_TABLES + (S.RUNS,):
            _delete_partition(spark, fs, root, table, run_id)
            if database:
                catalog.drop_partition(spark, database, table, run_id)
        fs.delete(lake.run_files_path(root, run_id))
        checkpoints = plan.checkpoints[run_id]
        lake.FileSystem(spark, checkpoints).delete(checkpoints)
        log.info("gc: deleted run %s", run_id)
    for run_id in plan.orphaned_staging:
        fs.delete(lake.staging_path(root, run_id))
        log.info("gc: deleted staging of %s", run_id)
