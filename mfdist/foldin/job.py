"""The fold-in job: the base run, the Spark plan of the solves, and the run it publishes (see :mod:`mfdist.foldin`)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import partial
from typing import Optional

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from mfdist import lake
from mfdist import schema as S
from mfdist.config import Config
from mfdist.errors import ConfigError
from mfdist.foldin.solve import Ridge, dense_side, solve_against, solve_partition
from mfdist.ingest import count_by_reason, ingest
from mfdist.model import Model
from mfdist.pipeline import Metrics, with_ingest_counts
from mfdist.publish import Publisher, RunRecord, epochs_frame, factor_table, metrics_frame
from mfdist.published import factor_rank, run_config, run_metric, run_mu
from mfdist.recommend import recommend, similar_item_lists, similar_items_table
from mfdist.reindex import build_index, check_capacity
from mfdist.report import build_report
from mfdist.train.dsgd.tasks import FREQUENCY_EXPONENT

log = logging.getLogger(__name__)


def ridge_for(base: Config, *, mean_count: float, reg: Optional[float] = None) -> Ridge:
    """The penalties of the trainer that fitted the base run (``reg``: the one it fitted with, where it recorded one)."""
    t = base.train
    reg = t.reg if reg is None else reg
    if t.algorithm == "als":
        return Ridge(reg, t.bias_reg, t.biases)
    return Ridge(reg, t.bias_reg, t.biases, exponent=FREQUENCY_EXPONENT, mean_count=mean_count)


def fold_in(ratings: DataFrame, fixed: DataFrame, *, key: str, other: str, mu: float, rank: int, ridge: Ridge,
            broadcast_max_mb: int) -> DataFrame:
    """(key, bias, factors) for every ``key`` of ``ratings`` (key, other, rating), against ``fixed`` (other, bias, factors).

    ``fixed`` is broadcast to the Python workers when its vectors fit ``broadcast_max_mb``: the ratings then cross
    one shuffle, by key, as (key, other, rating) only, and each task looks their fixed rows up itself; otherwise
    both sides meet by ``other`` in a shuffle join and the joined rows, a vector each, are shuffled by key.
    """
    n_fixed = fixed.count()
    schema = S.MODEL_SCHEMA_USERS if key == S.USER_IDX else S.MODEL_SCHEMA_ITEMS
    if n_fixed * (4 * rank + 8) / 2**20 <= broadcast_max_mb:
        # A vector per rating through the JVM and Arrow cost most of the stage (10k users x 39 ratings, rank 50: 4.7 s).
        table = fixed.select(other, S.BIAS, S.FACTORS).toArrow()
        shared = ratings.sparkSession.sparkContext.broadcast(dense_side(table, idx_col=other, rank=rank))
        rows = ratings.select(key, other, (F.col(S.RATING) - F.lit(mu)).alias("_y"))
        task = solve_against(shared, key=key, other=other, rank=rank, ridge=ridge)
    else:
        joined = ratings.join(fixed, other)
        rows = joined.select(key, (F.col(S.RATING) - F.lit(mu) - F.col(S.BIAS)).alias("_y"), F.col(S.FACTORS).alias("_q"))
        task = partial(solve_partition, key=key, rank=rank, ridge=ridge)
    # Sorted partitions, not groupBy().applyInArrow, whose Python call per key made the stage 1.4x slower (10k users).
    return rows.repartition(key).sortWithinPartitions(key).mapInArrow(task, schema)


@dataclass(frozen=True)
class Side:
    """The tables of one side of the model."""

    name: str  # users | items
    id_col: str
    idx_col: str
    index: str
    factors: str


USERS = Side("users", S.USER_ID, S.USER_IDX, S.USER_INDEX, S.USER_FACTORS)
ITEMS = Side("items", S.ITEM_ID, S.ITEM_IDX, S.ITEM_INDEX, S.ITEM_FACTORS)


def _base(spark: SparkSession, cfg: Config) -> tuple[str, Config]:
    """The base run's id and recorded config; a missing run or one fold-in cannot solve against is a ConfigError."""
    base_id = cfg.foldin.base_run
    if base_id is None:
        raise ConfigError("foldin.base_run: required: the run whose factors the new ratings are folded in against")
    base = run_config(spark, cfg.output.root, base_id, key="foldin.base_run")
    if base.input.implicit or base.train.nonnegative:
        raise ConfigError(
            f"foldin.base_run: run {base_id} was trained with "
            f"{'input.implicit' if base.input.implicit else 'train.nonnegative'}; fold-in solves explicit, unconstrained least squares"
        )
    if cfg.input.implicit:
        raise ConfigError("input.implicit: fold-in solves explicit ratings")
    return base_id, base


def _unknown_rejected(rows: DataFrame, *, reason: str) -> DataFrame:
    """Accepted ratings the fold-in cannot use, as ``rejected_ratings`` rows (their columns as strings)."""
    return rows.select(*[F.col(c).cast("string").alias(c) for c in S.RAW_COLUMNS], F.lit(reason).alias(S.REASON))


@dataclass
class FoldinResult:
    record: RunRecord
    folded: int
    new_ids: int
    metrics: dict[tuple[str, str], float]


def run_foldin(spark: SparkSession, cfg: Config) -> FoldinResult:
    """Fold the ratings of ``input`` into run ``foldin.base_run`` and publish the result as run ``run.run_id``."""
    root, run_id = cfg.output.root, cfg.run.run_id
    base_id, base = _base(spark, cfg)
    side, other = (USERS, ITEMS) if cfg.foldin.side == "users" else (ITEMS, USERS)
    # The run records the base's trainer settings, so a later fold-in or warm start on it solves the same objective.
    publisher = Publisher(spark, replace(cfg, train=base.train))
    record = publisher.begin(algorithm="foldin")
    metrics = Metrics()
    try:
        with metrics.timed("ingest") as info:
            given = ingest(spark, cfg.input)
            record = with_ingest_counts(record, [given], metrics, info)

        def published(table: str) -> DataFrame:
            return lake.read_partition(spark, root, table, base_id)

        fixed = published(other.factors).select(other.id_col, other.idx_col, S.BIAS, S.FACTORS).cache()
        rank = factor_rank(fixed)
        with_fixed = given.ratings.join(fixed.select(other.id_col, other.idx_col), other.id_col, "left")
        known = with_fixed.where(F.col(other.idx_col).isNotNull())
        unusable = _unknown_rejected(with_fixed.where(F.col(other.idx_col).isNull()), reason=f"{other.id_col} has no factors in run {base_id}")
        rejected = given.rejected.unionByName(unusable)
        n_unusable = unusable.count()
        record = replace(record, accepted_rows=record.accepted_rows - n_unusable, rejected_rows=record.rejected_rows + n_unusable)
        metrics.add("foldin", "rejected_rows", n_unusable)
        with metrics.timed("reindex") as info:
            base_index = published(side.index)
            # Only ids with a usable rating get an index, as training indexes only accepted ratings.
            index = build_index(known, base_index, id_col=side.id_col, idx_col=side.idx_col, table=side.index).cache()
            size = index.count()
            check_capacity(size, side.index)
            new_ids = size - base_index.count()
            info.update(ids=size, new_ids=new_ids)
        metrics.add("reindex", side.name, size)
        metrics.add("reindex", f"new_{side.name}", new_ids)

        with metrics.timed("foldin") as info:
            usable = known.join(index, side.id_col).cache()
            mu = run_mu(spark, root, base_id)
            train_rows = run_metric(spark, root, base_id, "split", "train_rows")
            trained = published(side.factors).count()
            # train.tune_reg's choice, or the configured reg (runs before the metric was recorded).
            ridge = ridge_for(base, mean_count=(train_rows or trained) / max(trained, 1), reg=run_metric(spark, root, base_id, "train", "reg"))
            solved = fold_in(usable, fixed.select(other.idx_col, S.BIAS, S.FACTORS), key=side.idx_col, other=other.idx_col,
                             mu=mu, rank=rank, ridge=ridge,
                             broadcast_max_mb=cfg.output.broadcast_max_mb).cache()
            folded = solved.count()
            info.update(folded=folded, rank=rank, base_run=base_id)
        metrics.add("foldin", side.name, folded)
        # metrics.value is a number, so the base run's id is in the metric's name.
        metrics.add("foldin", f"base_run={base_id}", 1.0)
        metrics.add("train", "mu", mu)  # jobs/recommend.py and later fold-ins score this run with it
        metrics.add("train", "reg", ridge.reg)

        with metrics.timed("recommend") as info:
            base_recs = published(S.RECOMMENDATIONS)
            if side is USERS:
                model = Model(mu=mu, users=solved, items=fixed.select(S.ITEM_IDX, S.BIAS, S.FACTORS), rank=rank)
                output = replace(cfg.output, similar_items=0, cold_start_popular=False)
                fresh = recommend(spark, model, usable, index, published(S.ITEM_INDEX), output=output, k=cfg.output.top_n)
                kept = base_recs.join(usable.select(S.USER_ID).distinct(), S.USER_ID, "left_anti")
                recommendations = kept.unionByName(fresh.recommendations)
                similar = published(S.SIMILAR_ITEMS)
                info.update(users_listed=fresh.listed_users)
            else:
                items = published(S.ITEM_FACTORS).select(S.ITEM_IDX, S.BIAS, S.FACTORS).join(solved, S.ITEM_IDX, "left_anti")
                lists = similar_item_lists(items.unionByName(solved), k=cfg.output.similar_items,
                                           broadcast_max_mb=cfg.output.broadcast_max_mb)
                recommendations, similar = base_recs, similar_items_table(lists, index)

        with metrics.timed("publish") as info:
            carried = published(side.factors).join(solved.select(side.idx_col), side.idx_col, "left_anti")
            tables = {
                side.index: index,
                other.index: published(other.index),
                side.factors: carried.unionByName(factor_table(solved, index, idx_col=side.idx_col)),
                other.factors: published(other.factors),
                S.RECOMMENDATIONS: recommendations,
                S.SIMILAR_ITEMS: similar,
                S.REJECTED_RATINGS: rejected,
                S.EPOCHS: epochs_frame(spark, []),
            }
            publisher.write_all(tables)
            info.update(root=root, run_id=run_id)
        publisher.write(S.METRICS, metrics_frame(spark, metrics.rows))
        publisher.write_report(build_report(record, metrics.rows, [], count_by_reason(rejected, total=record.rejected_rows)))
        record = publisher.commit(record)
    except BaseException as exc:
        publisher.fail(record, exc)
        raise
    return FoldinResult(record=record, folded=folded, new_ids=new_ids, metrics=metrics.as_dict())
