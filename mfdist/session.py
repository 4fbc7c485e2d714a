"""Build the SparkSession from the `spark` config section (master never hard-coded)."""

from __future__ import annotations

import logging

from pyspark.sql import SparkSession

from mfdist.catalog import local_catalog_conf
from mfdist.config import Config

# Partition values such as run_id=20261122 must stay strings, whatever they look like.
_FIXED_CONF = {"spark.sql.sources.partitionColumnTypeInference.enabled": "false"}


def build_session(cfg: Config) -> SparkSession:
    """Create (or reuse) the session with `spark.master` and `spark.conf` applied."""
    builder = SparkSession.builder.appName(cfg.run.name)
    if cfg.spark.master:
        builder = builder.master(cfg.spark.master)
    for key, value in {**cfg.spark.conf, **local_catalog_conf(cfg), **_FIXED_CONF}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    return spark


def release_cached(spark: SparkSession) -> None:
    """Drop every cached DataFrame and persisted RDD (MLlib's ALS factor blocks included)."""
    spark.catalog.clearCache()
    for rdd in spark.sparkContext._jsc.getPersistentRDDs().values():
        rdd.unpersist(False)
