"""``train.warm_start``: the factors and biases of a published run, on this run's indices, as DSGD's epoch 0.

The base is ``train.warm_start_run``, else the newest succeeded run under
``output.root`` (none yet: the run starts cold, as a scheduled job's first
night does). Its published factor tables are joined to this run's index by
id, so an id keeps its row whatever index the base gave it; ids new since the
base start from random factors as in a cold start. The frames stay in Spark
(the DSGD trainer joins them into its epoch-0 blocks).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pyspark.sql import DataFrame, SparkSession

from mfdist import lake
from mfdist import schema as S
from mfdist.config import Config
from mfdist.errors import ConfigError
from mfdist.published import factor_rank, factors_on, run_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmStart:
    """The base run's factor rows on this run's indices (idx, bias, factors per side).

    Its biases are kept as published around this run's own mean rating, which moves little
    between nightly runs (the biases absorb the rest in the first epoch).
    """

    run_id: str
    users: DataFrame
    items: DataFrame

    def side(self, idx_col: str) -> DataFrame:
        return self.users if idx_col == S.USER_IDX else self.items


def warm_start(spark: SparkSession, cfg: Config, user_index: DataFrame, item_index: DataFrame) -> WarmStart | None:
    """The base run's model for ``cfg`` (None: no run to start from); a missing run or another rank is a ConfigError."""
    root, t = cfg.output.root, cfg.train
    named = t.warm_start_run is not None
    run_id = t.warm_start_run if named else lake.latest_succeeded_run(spark, root, exclude=cfg.run.run_id)
    if run_id is None:
        log.warning("train.warm_start: no succeeded run under %s yet; starting from random factors", root)
        return None
    key = "train.warm_start_run" if named else "train.warm_start"
    run_config(spark, root, run_id, key=key)  # it exists and succeeded
    users = factors_on(spark, root, run_id, user_index, table=S.USER_FACTORS)
    items = factors_on(spark, root, run_id, item_index, table=S.ITEM_FACTORS)
    rank = factor_rank(items)
    if rank != t.rank:
        raise ConfigError(
            f"{key}: run {run_id} has rank {rank} factors but train.rank is {t.rank}; "
            f"warm start needs the same rank (set train.rank={rank} or start cold)"
        )
    log.info("train.warm_start: starting from the factors of run %s", run_id)
    return WarmStart(run_id, users, items)
