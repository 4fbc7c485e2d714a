"""Stage 6, evaluate: rating-prediction error (RMSE, MAE) of a Model on the test split.

Predictions are ``mu + b_u + b_i + p_u . q_i`` clipped to ``rating_range``. A
test user or item without trained factors is scored with the bias model (its
missing terms count as 0), not dropped; the number of such test rows is reported.

Ranking metrics @K are computed from the recommend stage's lists (user_idx,
rank, item_idx; that stage runs after the rating metrics and builds the lists
once with K = max(output.top_n, evaluate.k)) and recorded under ``evaluate``.
They follow pyspark's RankingMetrics, averaged over the test users with at
least one relevant test item (a user without a list scores 0): a test item is
relevant when its rating >= ``evaluate.relevance_threshold`` (default 4 on a
1..5 scale, mapped linearly onto ``input.rating_range``; every test interaction
for implicit input). Per user, with ``hits`` the relevant items in the top K:

- precision@K = |hits| / K, recall@K = |hits| / |relevant|;
- ndcg@K = sum over hits of 1/log2(rank + 1), divided by the same sum over
  ranks 1..min(|relevant|, K);
- map@K = sum over hits of (hits at rank <= r) / r, divided by min(|relevant|, K).

coverage@K is the share of the model's items in any top-K list, full_lists@K
the share of the users due a list whose list has K items. Everything is
aggregated in Spark; only the averages reach the driver.
"""

from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from mfdist import schema as S
from mfdist.model import Model, predict


def rating_metrics(test: DataFrame, model: Model, *, rating_range: list[float]) -> dict[str, float]:
    """rmse, mae, test_rows, unseen_user_rows, unseen_item_rows in one pass."""
    err = F.col(S.PREDICTION) - F.col(S.RATING)
    row = (
        predict(test, model, rating_range=rating_range)
        .agg(
            F.sqrt(F.avg(err * err)).alias("rmse"),
            F.avg(F.abs(err)).alias("mae"),
            F.count(F.lit(1)).alias("test_rows"),
            F.sum(F.col("unseen_user").cast("long")).alias("unseen_user_rows"),
            F.sum(F.col("unseen_item").cast("long")).alias("unseen_item_rows"),
        )
        .first()
    )
    return {k: float(v or 0.0) for k, v in row.asDict().items()}


# Ranking metrics (per user, averaged) and list metrics (over all lists) that evaluate.metrics can name.
RANKING_METRICS = ("precision", "recall", "ndcg", "map")
LIST_METRICS = ("coverage",)
# The default relevance threshold: 4 on a 1..5 scale, as a fraction of the rating range.
RELEVANT_FRACTION = 0.75


def relevance_threshold(threshold: float | None, *, rating_range: list[float], implicit: bool) -> float | None:
    """The rating at which a test item becomes relevant; None (every interaction) for implicit input."""
    if threshold is not None:
        return threshold
    if implicit:
        return None
    lo, hi = rating_range
    return lo + RELEVANT_FRACTION * (hi - lo)


def relevant_items(test: DataFrame, *, threshold: float | None) -> DataFrame:
    """user_idx, item_idx of the relevant test ratings."""
    kept = test if threshold is None else test.where(F.col(S.RATING) >= threshold)
    return kept.select(S.USER_IDX, S.ITEM_IDX)


def ranking_metrics(lists: DataFrame, relevant: DataFrame, *, k: int, names: list[str]) -> dict[str, float]:
    """precision@k, recall@k, ndcg@k, map@k (those in ``names``) over users with a relevant test item."""
    wanted = [n for n in RANKING_METRICS if n in names]
    if not wanted:
        return {}
    hits = lists.where(F.col("rank") <= k).join(relevant, [S.USER_IDX, S.ITEM_IDX]).select(S.USER_IDX, "rank")
    nth_hit = F.row_number().over(Window.partitionBy(S.USER_IDX).orderBy("rank"))
    per_user_hits = (
        hits.withColumn("_nth", nth_hit)
        .groupBy(S.USER_IDX)
        .agg(
            F.count(F.lit(1)).alias("_hits"),
            F.sum(1.0 / F.log2(F.col("rank") + 1)).alias("_dcg"),
            F.sum(F.col("_nth") / F.col("rank")).alias("_ap"),
        )
    )
    per_user = (
        relevant.groupBy(S.USER_IDX)
        .agg(F.count(F.lit(1)).alias("_relevant"))
        .join(per_user_hits, S.USER_IDX, "left")
        .fillna(0, subset=["_hits", "_dcg", "_ap"])
    )
    cutoff = F.least(F.col("_relevant"), F.lit(k))
    ideal = F.aggregate(F.sequence(F.lit(1), cutoff), F.lit(0.0), lambda acc, r: acc + 1.0 / F.log2(r + 1))
    formulas = {
        "precision": F.col("_hits") / k,
        "recall": F.col("_hits") / F.col("_relevant"),
        "ndcg": F.col("_dcg") / ideal,
        "map": F.col("_ap") / cutoff,
    }
    row = per_user.agg(*[F.avg(formulas[n]).alias(n) for n in wanted]).first()
    return {f"{n}@{k}": float(row[n] or 0.0) for n in wanted}


def list_metrics(lists: DataFrame, *, k: int, n_items: int, n_users: int) -> dict[str, float]:
    """coverage@k (share of the n_items in any top-k list) and full_lists@k (share of n_users with k items)."""
    row = lists.where(F.col("rank") <= k).agg(
        F.countDistinct(S.ITEM_IDX).alias("items"), F.count(F.when(F.col("rank") == k, 1)).alias("full")
    ).first()
    return {f"coverage@{k}": row["items"] / max(n_items, 1), f"full_lists@{k}": row["full"] / max(n_users, 1)}


def ranking_report(
    lists: DataFrame, test: DataFrame, *, k: int, names: list[str], threshold: float | None, n_items: int, n_users: int
) -> dict[str, float]:
    """Every ranking and list metric in ``names`` at ``k``, keyed like precision@10."""
    report = ranking_metrics(lists, relevant_items(test, threshold=threshold), k=k, names=names)
    if any(n in names for n in LIST_METRICS):
        report.update(list_metrics(lists, k=k, n_items=n_items, n_users=n_users))
    return report
