"""SQL access for analysts: catalog tables over the lake and ``<table>_latest`` views.

With ``output.database`` set, every table is registered in the Spark catalog
(Hive metastore, Glue or Unity Catalog on a cluster; locally an embedded Derby
metastore under the lake) as an external table over its location, partitioned
by run_id, and ``<table>_latest`` views select the newest succeeded run. Without
a database, :func:`register_temp_views` gives one session the same names.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pyspark.sql import SparkSession

from mfdist import lake
from mfdist import schema as S
from mfdist.config import Config

log = logging.getLogger(__name__)

DERBY_URL_KEY = "spark.hadoop.javax.jdo.option.ConnectionURL"


def local_catalog_conf(cfg: Config) -> dict[str, str]:
    """Hive support with a Derby metastore and warehouse under a local ``output.root``, for ``output.database``.

    Asked for by ``output.database`` alone (or by ``spark.sql.catalogImplementation: hive``).
    On a cluster the metastore is the platform's (Glue, Unity Catalog, Hive), so nothing is added
    there, nor when the config names a metastore or another catalog itself.
    """
    conf = cfg.spark.conf
    local = (cfg.spark.master or "").startswith("local") and "://" not in cfg.output.root
    catalog = conf.get("spark.sql.catalogImplementation", "hive" if cfg.output.database else None)
    if catalog != "hive" or DERBY_URL_KEY in conf or not local:
        return {}
    root = Path(cfg.output.root).resolve()
    return {
        "spark.sql.catalogImplementation": "hive",
        DERBY_URL_KEY: f"jdbc:derby:;databaseName={root / '_metastore' / 'metastore_db'};create=true",
        "spark.sql.warehouse.dir": str(root / "_warehouse"),
        "spark.driver.extraJavaOptions": f"{conf.get('spark.driver.extraJavaOptions', '')} -Dderby.system.home={root / '_metastore'}".strip(),
    }


def quote_part(name: str) -> str:
    """One backquoted SQL identifier (a name, or a path as in ``delta.`<path>```)."""
    return "`" + name.replace("`", "``") + "`"


def quote_ident(name: str) -> str:
    """``name`` (``db`` or ``catalog.db.table``) as backquoted SQL identifiers."""
    return ".".join(quote_part(part) for part in name.split("."))


def sql_string(value: str) -> str:
    """``value`` as a SQL string literal (Spark SQL escapes with backslashes)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def latest_sql(table: str, runs: str) -> str:
    """A query of ``table``'s rows from the newest succeeded run recorded in ``runs`` (both names quoted here)."""
    newest = (
        f"SELECT {S.RUN_ID} FROM {quote_ident(runs)} WHERE status = 'succeeded' "
        f"ORDER BY finished_at DESC, {S.RUN_ID} DESC LIMIT 1"
    )
    return f"SELECT * FROM {quote_ident(table)} WHERE {S.RUN_ID} = ({newest})"


def _hive_managed(spark: SparkSession) -> bool:
    """Whether the catalog tracks partitions itself (Hive metastore) rather than listing files."""
    return spark.conf.get("spark.sql.catalogImplementation", "in-memory") == "hive"


def _source(spark: SparkSession, root: str, table: str) -> str:
    path = lake.table_path(root, table)
    return "delta" if lake.FileSystem(spark, path).exists(f"{path}/_delta_log") else "parquet"


def register_table(spark: SparkSession, database: str, root: str, table: str, run_id: str) -> None:
    """Create ``database.table`` over its location if missing and add the run's partition."""
    path = lake.FileSystem(spark, root).qualify(lake.table_path(root, table))
    source = _source(spark, root, table)
    name = quote_ident(f"{database}.{table}")
    spark.sql(f"CREATE TABLE IF NOT EXISTS {name} USING {source} LOCATION {sql_string(path)}")
    if source == "parquet" and _hive_managed(spark):
        part = f"{path}/{S.RUN_ID}={run_id}"
        spark.sql(f"ALTER TABLE {name} ADD IF NOT EXISTS PARTITION ({S.RUN_ID}={sql_string(run_id)}) LOCATION {sql_string(part)}")
    refresh(spark, database, table)


def refresh(spark: SparkSession, database: str, table: str) -> None:
    """Drop the session's cached file listing of ``database.table`` (its files were replaced)."""
    spark.sql(f"REFRESH TABLE {quote_ident(f'{database}.{table}')}")


def drop_partition(spark: SparkSession, database: str, table: str, run_id: str) -> None:
    """Forget a deleted run's partition in the catalog (files are removed by the caller)."""
    name = f"{database}.{table}"
    if _hive_managed(spark) and spark.catalog.tableExists(name):
        spark.sql(f"ALTER TABLE {quote_ident(name)} DROP IF EXISTS PARTITION ({S.RUN_ID}={sql_string(run_id)})")


def create_latest_views(spark: SparkSession, database: str, tables: list[str]) -> None:
    """``<table>_latest`` for every registered table that has none yet (the query names no run, so it never changes)."""
    runs = f"{database}.{S.RUNS}"
    for table in tables:
        view = quote_ident(f"{database}.{table}_latest")
        spark.sql(f"CREATE VIEW IF NOT EXISTS {view} AS {latest_sql(f'{database}.{table}', runs)}")


def register_run(spark: SparkSession, cfg: Config, tables: list[str]) -> None:
    """Register ``tables`` and this run's partitions, then (re)create the _latest views."""
    database, root, run_id = cfg.output.database, cfg.output.root, cfg.run.run_id
    assert database is not None
    spark.sql(f"CREATE DATABASE IF NOT EXISTS {quote_ident(database)}")
    for table in tables:
        register_table(spark, database, root, table, run_id)
    registered = [t for t in S.ALL_TABLES if spark.catalog.tableExists(f"{database}.{t}")]
    create_latest_views(spark, database, registered)
    log.info("catalog: %s registered in database %s", ", ".join(tables), database)


def register_temp_views(spark: SparkSession, root: str) -> list[str]:
    """Temp views ``<table>`` and ``<table>_latest`` over the lake for this session; returns the tables found."""
    found = []
    for table in S.ALL_TABLES:
        df = lake.read_table(spark, root, table)
        if df is not None:
            df.createOrReplaceTempView(table)
            found.append(table)
    if S.RUNS in found:
        for table in found:
            spark.sql(f"CREATE OR REPLACE TEMP VIEW {quote_ident(table + '_latest')} AS {latest_sql(table, S.RUNS)}")
    return found
