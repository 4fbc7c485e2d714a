"""A succeeded run under ``output.root`` as the base of another job: its recorded config and its model.

jobs/recommend.py rescores a run, ``train.warm_start`` starts DSGD from a run's
factors and jobs/foldin.py solves new users against a run's items. Each names
the run by a config key, and a run that is missing or not succeeded is a
:class:`~mfdist.errors.ConfigError` naming that key. Everything read here is a
bounded action (one runs row, one metric, one array size); the factor frames
stay in Spark.
"""

from __future__ import annotations

import json
from typing import Optional

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from mfdist import lake
from mfdist import schema as S
from mfdist.config import Config, config_from_dict
from mfdist.errors import ConfigError, InputError
from mfdist.model import Model


def run_config(spark: SparkSession, root: str, run_id: str, *, key: str) -> Config:
    """The config succeeded run ``run_id`` recorded in ``runs``; ConfigError naming ``key`` when there is no such run."""
    runs = lake.runs_by_status(spark, root)
    row = None if runs is None else runs.where(F.col(S.RUN_ID) == run_id).select("config").first()
    if row is None:
        raise ConfigError(f"{key}: no succeeded run {run_id} under {root}")
    return config_from_dict(json.loads(row[0]))


def run_metric(spark: SparkSession, root: str, run_id: str, stage: str, metric: str) -> Optional[float]:
    """A run's ``metrics`` value of ``stage``/``metric``, or None when it has none."""
    row = (
        lake.read_partition(spark, root, S.METRICS, run_id)
        .where((F.col("stage") == stage) & (F.col("metric") == metric))
        .select("value")
        .first()
    )
    return None if row is None else float(row[0])


def run_mu(spark: SparkSession, root: str, run_id: str) -> float:
    """The global mean a run's model predicts with (metric ``train``/``mu``)."""
    mu = run_metric(spark, root, run_id, "train", "mu")
    if mu is None:
        raise InputError(f"run {run_id} under {root}: its metrics have no train/mu; retrain it with this version")
    return mu


def factor_rank(side: DataFrame) -> int:
    """The length of a factor frame's vectors (0 when it has no rows)."""
    row = side.select(F.size(S.FACTORS)).first()
    return int(row[0]) if row else 0


def published_model(spark: SparkSession, root: str, run_id: str) -> Model:
    """The Model of a published run: its factor tables by index and its ``mu``."""
    mu = run_mu(spark, root, run_id)
    users = lake.read_partition(spark, root, S.USER_FACTORS, run_id).select(S.USER_IDX, S.BIAS, S.FACTORS)
    items = lake.read_partition(spark, root, S.ITEM_FACTORS, run_id).select(S.ITEM_IDX, S.BIAS, S.FACTORS)
    return Model(mu=mu, users=users.cache(), items=items.cache(), rank=factor_rank(items))


def factors_on(spark: SparkSession, root: str, run_id: str, index: DataFrame, *, table: str) -> DataFrame:
    """A run's published ``table`` (user_factors or item_factors) on the indices of ``index`` (joined by id):
    idx, bias, factors of the ids both have."""
    id_col, idx_col = (S.USER_ID, S.USER_IDX) if table == S.USER_FACTORS else (S.ITEM_ID, S.ITEM_IDX)
    published = lake.read_partition(spark, root, table, run_id).select(id_col, S.BIAS, S.FACTORS)
    return index.join(published, id_col).select(idx_col, S.BIAS, S.FACTORS)
