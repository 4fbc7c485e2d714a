"""Stage 6b, recommend: per-user top-N and per-item similar items, by one blocked top-K.

Order in the job: evaluate (rmse, mae) -> **recommend** -> publish. The stage
computes every user's list once, with ``K = max(output.top_n, evaluate.k)``;
the ranking metrics (:func:`mfdist.evaluate.ranking_report`) are computed from
those lists and recorded under stage ``evaluate``, and ``recommendations``
keeps the ranks <= ``output.top_n``. ``jobs/recommend.py`` reruns this stage
from a published run's factors (:func:`republish`).

Inputs: a :class:`~mfdist.train.Model`, the training ratings (user_idx,
item_idx: the seen items) and ``user_index`` / ``item_index``. Outputs, with
original ids:

- ``recommendations``: user_id, rank int (1 = best), item_id, score float.
  Score ``mu + b_u + b_i + p_u . q_i``; a user's training items are excluded;
  equal scores rank by item index. Users without training ratings get no list,
  or with ``output.cold_start_popular`` the items with the most training
  ratings (score = that count).
- ``similar_items``: item_id, rank int, similar_item_id, similarity float:
  cosine over item factors (normalized once; a zero vector has similarity 0
  with every item), the item itself excluded.

The lists come from one blocked top-K (:mod:`mfdist.topk`, whose code runs in
the Python workers), planned here by :func:`top_k_lists`: queries ``_q, _vec,
_exclude`` against candidates ``_c, _vec``. The user score is one dot product
of augmented vectors ``[p_u, b_u, 1] . [q_i, 1, b_i + mu]``, so biases cost no
extra pass; similar items use unit item vectors and exclude the item itself.
Candidates that fit ``output.broadcast_max_mb`` are broadcast to a
``mapInArrow`` over the queries; larger ones go through the block join (a
cogroup of query groups with candidate groups, ``applyInArrow``, then a window
that merges the partial top-Ks by score desc, id asc).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from mfdist import lake, topk
from mfdist import schema as S
from mfdist.config import Config, OutputConfig
from mfdist.errors import ConfigError
from mfdist.publish import Publisher
from mfdist.published import published_model, run_config
from mfdist.topk import C, EXCLUDE, Q, RANK, SCORE, VEC, Blocks
from mfdist.model import Model

log = logging.getLogger(__name__)


# Columns of the Spark-side plans.
QB, CB = "_qb", "_cb"
LIST_SCHEMA = T.StructType(
    [
        T.StructField(Q, T.IntegerType(), False),
        T.StructField(RANK, T.IntegerType(), False),
        T.StructField(C, T.IntegerType(), False),
        T.StructField(SCORE, T.FloatType(), False),
    ]
)
SIMILAR_IDX = "similar_item_idx"
SIMILAR_ID, SIMILARITY = S.SIMILAR_ITEMS_COLUMNS[2], S.SIMILAR_ITEMS_COLUMNS[3]
POPULARITY = "_n"


# ---------------------------------------------------------------- Spark: the blocked top-K


def _broadcast_lists(queries: DataFrame, candidates: DataFrame, *, k: int, blocks: Blocks) -> DataFrame:
    table = candidates.select(C, VEC).toArrow()  # bounded by output.broadcast_max_mb
    shared = queries.sparkSession.sparkContext.broadcast(topk.sorted_candidates(table))
    return queries.select(Q, VEC, EXCLUDE).mapInArrow(topk.broadcast_task(shared, k, blocks), LIST_SCHEMA)


def _block_join_lists(queries: DataFrame, candidates: DataFrame, *, k: int, n_candidates: int, blocks: Blocks) -> DataFrame:
    # At least one query group per core, so a small query side still spreads over the cluster.
    parallelism = queries.sparkSession.sparkContext.defaultParallelism
    n_qb = max(parallelism, math.ceil(queries.count() / blocks.join_queries))
    n_cb = max(1, math.ceil(n_candidates / blocks.join_candidates))
    # Each query row goes to every candidate group and each candidate to every query group,
    # so the cogroup of (query group, candidate group) is the cross join of the groups.
    q = queries.select(Q, VEC, EXCLUDE, (F.col(Q) % n_qb).alias(QB), F.explode(F.sequence(F.lit(0), F.lit(n_cb - 1))).alias(CB))
    c = candidates.select(C, VEC, (F.col(C) % n_cb).alias(CB), F.explode(F.sequence(F.lit(0), F.lit(n_qb - 1))).alias(QB))
    partial = q.groupBy(QB, CB).cogroup(c.groupBy(QB, CB)).applyInArrow(topk.pair_task(k, blocks), LIST_SCHEMA)
    best = Window.partitionBy(Q).orderBy(F.col(SCORE).desc(), F.col(C))
    ranked = partial.withColumn(RANK, F.row_number().over(best).cast(T.IntegerType()))
    return ranked.where(F.col(RANK) <= k).select(*LIST_SCHEMA.fieldNames())


def top_k_lists(
    queries: DataFrame, candidates: DataFrame, *, k: int, broadcast_max_mb: int, blocks: Blocks = Blocks()
) -> DataFrame:
    """(_q, rank, _c, score): each query's best ``k`` candidates, excluded ids skipped, ties by candidate id.

    ``queries``: _q int, _vec array<float>, _exclude array<int> (not null);
    ``candidates``: _c int, _vec array<float> of the same length.
    """
    spark = queries.sparkSession
    # k = 0 (no lists wanted) costs no Spark job at all.
    n, dim = candidates.agg(F.count(F.lit(1)), F.max(F.size(VEC))).first() if k else (0, 0)
    if not n:
        # limit(0) makes the frame an empty LocalRelation to the optimizer, which then drops the joins onto
        # it (the id lookups of the published tables), so writing them scans no index.
        return spark.createDataFrame([], LIST_SCHEMA).limit(0)
    size_mb = n * (4 * dim + 4) / 2**20
    if size_mb <= broadcast_max_mb:
        log.info("top-k: k=%d, broadcasting %d candidates (%.1f MiB)", k, n, size_mb)
        return _broadcast_lists(queries, candidates, k=k, blocks=blocks)
    log.info("top-k: k=%d, block join over %d candidates (%.1f MiB > output.broadcast_max_mb)", k, n, size_mb)
    return _block_join_lists(queries, candidates, k=k, n_candidates=n, blocks=blocks)


# ---------------------------------------------------------------- users and items


def _floats(*cols: F.Column | str) -> F.Column:
    return F.concat(*cols).cast(T.ArrayType(T.FloatType()))


def seen_items(train: DataFrame) -> DataFrame:
    """user_idx, _exclude: each user's training items (one list per user, shipped with its query row)."""
    return train.groupBy(S.USER_IDX).agg(F.collect_list(S.ITEM_IDX).alias(EXCLUDE))


def user_lists(
    model: Model, seen: DataFrame | None, *, k: int, broadcast_max_mb: int, biases: bool = True
) -> DataFrame:
    """user_idx, rank, item_idx, score: each user's top ``k`` items.

    With ``seen`` (from :func:`seen_items`) only users with training ratings get
    a list and their seen items are excluded; ``seen=None`` lists every model
    user with nothing excluded. ``biases=False`` scores ``p_u . q_i`` alone (mu
    and biases ignored: the setting of ALSModel.recommendForAllUsers).
    """
    one = F.array(F.lit(1.0))
    if biases:
        user_vec = _floats(S.FACTORS, F.array(F.col(S.BIAS)), one)
        item_vec = _floats(S.FACTORS, one, F.array(F.col(S.BIAS) + F.lit(model.mu)))
    else:
        user_vec = item_vec = F.col(S.FACTORS)
    users = model.users.select(F.col(S.USER_IDX).alias(Q), user_vec.alias(VEC))
    if seen is None:
        queries = users.withColumn(EXCLUDE, F.array().cast(T.ArrayType(T.IntegerType())))
    else:
        queries = users.join(seen.withColumnRenamed(S.USER_IDX, Q), Q)
    candidates = model.items.select(F.col(S.ITEM_IDX).alias(C), item_vec.alias(VEC))
    lists = top_k_lists(queries, candidates, k=k, broadcast_max_mb=broadcast_max_mb)
    return lists.select(F.col(Q).alias(S.USER_IDX), RANK, F.col(C).alias(S.ITEM_IDX), SCORE)


def popular_lists(spark: SparkSession, train: DataFrame, users: DataFrame, *, k: int) -> DataFrame:
    """user_idx, rank, item_idx, score: the ``k`` items with most training ratings (ties by index) for ``users``."""
    top = train.groupBy(S.ITEM_IDX).agg(F.count(F.lit(1)).alias(POPULARITY)).orderBy(F.desc(POPULARITY), S.ITEM_IDX).limit(k)
    rows = [(rank, r[S.ITEM_IDX], float(r[POPULARITY])) for rank, r in enumerate(top.collect(), start=1)]  # k rows
    schema = T.StructType([LIST_SCHEMA[RANK], T.StructField(S.ITEM_IDX, T.IntegerType(), False), LIST_SCHEMA[SCORE]])
    return users.select(S.USER_IDX).crossJoin(F.broadcast(spark.createDataFrame(rows, schema))).select(
        S.USER_IDX, RANK, S.ITEM_IDX, SCORE
    )


def similar_item_lists(items: DataFrame, *, k: int, broadcast_max_mb: int) -> DataFrame:
    """item_idx, rank, similar_item_idx, similarity: cosine over factors normalized once, self excluded."""
    norm = F.sqrt(F.aggregate(S.FACTORS, F.lit(0.0), lambda acc, x: acc + x * x))
    unit = F.transform(S.FACTORS, lambda x: F.when(norm > 0, x / norm).otherwise(F.lit(0.0)).cast(T.FloatType()))
    vectors = items.select(S.ITEM_IDX, unit.alias(VEC)).cache()
    queries = vectors.select(F.col(S.ITEM_IDX).alias(Q), VEC, F.array(F.col(S.ITEM_IDX)).alias(EXCLUDE))
    candidates = vectors.select(F.col(S.ITEM_IDX).alias(C), VEC)
    lists = top_k_lists(queries, candidates, k=k, broadcast_max_mb=broadcast_max_mb)
    return lists.select(F.col(Q).alias(S.ITEM_IDX), RANK, F.col(C).alias(SIMILAR_IDX), F.col(SCORE).alias(SIMILARITY))


def recommendations_table(lists: DataFrame, user_index: DataFrame, item_index: DataFrame) -> DataFrame:
    """The published ``recommendations`` columns: original user and item ids."""
    joined = lists.join(user_index, S.USER_IDX).join(item_index, S.ITEM_IDX)
    return joined.select(*S.RECOMMENDATIONS_COLUMNS)


def similar_items_table(lists: DataFrame, item_index: DataFrame) -> DataFrame:
    """The published ``similar_items`` columns: original ids of both items."""
    other = item_index.select(F.col(S.ITEM_IDX).alias(SIMILAR_IDX), F.col(S.ITEM_ID).alias(SIMILAR_ID))
    return lists.join(item_index, S.ITEM_IDX).join(other, SIMILAR_IDX).select(*S.SIMILAR_ITEMS_COLUMNS)


# ---------------------------------------------------------------- the stage


@dataclass
class Recommended:
    """The stage's output: cached lists (indices, K ranks) and the two publishable tables."""

    lists: DataFrame
    recommendations: DataFrame
    similar_items: DataFrame
    listed_users: int
    eligible_users: int  # users a list was wanted for (0 with k = 0)
    items: int  # candidate items, for coverage (0 with k = 0)


def recommend(
    spark: SparkSession,
    model: Model,
    train: DataFrame,
    user_index: DataFrame,
    item_index: DataFrame,
    *,
    output: OutputConfig,
    k: int,
) -> Recommended:
    """Lists of ``k >= output.top_n`` items per user (for the ranking metrics too) and the two tables."""
    seen = seen_items(train).cache()
    lists = user_lists(model, seen, k=k, broadcast_max_mb=output.broadcast_max_mb)
    # With k = 0 (no top-N, no ranking metrics) nothing is listed, so nothing is counted either.
    eligible = seen.count() if k else 0
    if output.cold_start_popular and k:
        cold = user_index.select(S.USER_IDX).join(seen, S.USER_IDX, "left_anti").cache()
        eligible += cold.count()
        lists = lists.unionByName(popular_lists(spark, train, cold, k=k))
    # Caching an empty frame (k = 0) would hide its emptiness from the optimizer.
    lists = lists.cache() if k else lists
    listed = lists.select(S.USER_IDX).distinct().count() if k else 0
    similar = similar_item_lists(model.items, k=output.similar_items, broadcast_max_mb=output.broadcast_max_mb)
    return Recommended(
        lists=lists,
        recommendations=recommendations_table(lists.where(F.col(RANK) <= output.top_n), user_index, item_index),
        similar_items=similar_items_table(similar, item_index),
        listed_users=listed,
        eligible_users=eligible,
        items=model.items.count() if k else 0,
    )


# ---------------------------------------------------------------- rerun from a published run (jobs/recommend.py)

def seen_pairs(spark: SparkSession, root: str, run_id: str) -> DataFrame:
    """user_idx, item_idx of the run's training split, as the training job kept them (no ingest, no split)."""
    path = lake.train_pairs_path(root, run_id)
    if not lake.FileSystem(spark, root).exists(path):
        raise ConfigError(f"run.run_id: run {run_id} under {root} kept no training pairs ({path}); retrain it with this version")
    return spark.read.parquet(path)


def republish(spark: SparkSession, cfg: Config) -> Recommended:
    """Recompute ``recommendations`` and ``similar_items`` of the succeeded run ``run.run_id`` and swap them in."""
    started = time.perf_counter()
    root, run_id = cfg.output.root, cfg.run.run_id
    trained = run_config(spark, root, run_id, key="run.run_id")
    if trained.foldin.base_run is not None:
        # It keeps no training pairs: the folded users' seen items are only in its own input.
        raise ConfigError(
            f"run.run_id: run {run_id} is a fold-in of run {trained.foldin.base_run}; its lists were recomputed by "
            "jobs/foldin.py, so rescore a training run (or fold in again with other output.* settings)"
        )
    user_index = lake.read_partition(spark, root, S.USER_INDEX, run_id).cache()
    item_index = lake.read_partition(spark, root, S.ITEM_INDEX, run_id).cache()
    model = published_model(spark, root, run_id)
    train = seen_pairs(spark, root, run_id)
    result = recommend(spark, model, train, user_index, item_index, output=cfg.output, k=cfg.output.top_n)
    Publisher(spark, cfg).replace(
        {S.RECOMMENDATIONS: result.recommendations, S.SIMILAR_ITEMS: result.similar_items},
        registered_in=trained.output.database,
    )
    log.info(
        "recommend: run %s rescored in %.1f s: %d of %d users listed, top_n=%d, similar_items=%d",
        run_id, time.perf_counter() - started, result.listed_users, result.eligible_users,
        cfg.output.top_n, cfg.output.similar_items,
    )
    return result
