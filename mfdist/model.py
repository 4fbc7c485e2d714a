"""The published model ``r ~ mu + b_u + b_i + p_u . q_i`` and prediction with it in Spark SQL.

``Model.users``: user_idx int, bias float, factors array<float>; ``Model.items``:
item_idx int, bias float, factors array<float> (rows with training ratings only).
Every trainer returns one; evaluate, refine, recommend and publish consume it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from mfdist import schema as S


@dataclass
class Model:
    mu: float
    users: DataFrame
    items: DataFrame
    rank: int


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
