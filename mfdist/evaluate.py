"""Stage 6, evaluate: rating-prediction error (RMSE, MAE) of a Model on the test split.

Predictions are ``mu + b_u + b_i + p_u . q_i`` clipped to ``rating_range``. A
test user or item without trained factors is scored with the bias model (its
missing terms count as 0), not dropped; the number of such test rows is reported.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from mfdist import schema as S
from mfdist.train import Model


def dot(a: str, b: str) -> Column:
    """Dot product of two array<float> columns in SQL (null when either is null)."""
    return F.aggregate(F.zip_with(a, b, lambda x, y: x * y), F.lit(0.0), lambda acc, v: acc + v)


def predict(pairs: DataFrame, model: Model, *, rating_range: list[float] | None = None) -> DataFrame:
    """``pairs`` (user_idx, item_idx, ...) with ``prediction`` and unseen_user / unseen_item flags."""
    users = model.users.select(S.USER_IDX, F.col(S.BIAS).alias("_bu"), F.col(S.FACTORS).alias("_p"))
    items = model.items.select(S.ITEM_IDX, F.col(S.BIAS).alias("_bi"), F.col(S.FACTORS).alias("_q"))
    joined = pairs.join(users, S.USER_IDX, "left").join(items, S.ITEM_IDX, "left")
    raw = F.lit(model.mu) + F.coalesce("_bu", F.lit(0.0)) + F.coalesce("_bi", F.lit(0.0)) + F.coalesce(dot("_p", "_q"), F.lit(0.0))
    pred = raw if rating_range is None else F.least(F.greatest(raw, F.lit(rating_range[0])), F.lit(rating_range[1]))
    return joined.select(
        *pairs.columns,
        pred.alias(S.PREDICTION),
        F.col("_p").isNull().alias("unseen_user"),
        F.col("_q").isNull().alias("unseen_item"),
    )


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
