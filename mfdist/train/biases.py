"""Global mean and regularized user/item biases, fitted by alternating least squares on sums.

``b_i = sum_u (r - mu - b_u) / (n_i + bias_reg)`` then
``b_u = sum_i (r - mu - b_i) / (n_u + bias_reg)``, repeated; each step is one
groupBy, so the cost is a few passes over the ratings and nothing is collected
but the mean.
"""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from mfdist import schema as S

BIAS_ITERATIONS = 3


def global_mean(ratings: DataFrame) -> float:
    return float(ratings.agg(F.avg(S.RATING)).first()[0])


def _minus_bias(base: DataFrame, bias: DataFrame | None, key: str) -> DataFrame:
    """``base`` with ``_r = _r0 - bias[key]`` (0 for a missing bias)."""
    if bias is None:
        return base.withColumn("_r", F.col("_r0"))
    joined = base.join(bias, key, "left")
    return joined.withColumn("_r", F.col("_r0") - F.coalesce(F.col(S.BIAS), F.lit(0.0))).drop(S.BIAS)


def _side_bias(residual: DataFrame, key: str, reg: float) -> DataFrame:
    return residual.groupBy(key).agg((F.sum("_r") / (F.count(F.lit(1)) + reg)).alias(S.BIAS)).cache()


def fit_biases(
    ratings: DataFrame, *, mu: float, reg: float, iterations: int = BIAS_ITERATIONS
) -> tuple[DataFrame, DataFrame]:
    """User and item bias frames (user_idx | item_idx, bias double) around ``mu``."""
    base = ratings.select(S.USER_IDX, S.ITEM_IDX, (F.col(S.RATING) - mu).alias("_r0"))
    user_bias = None
    for _ in range(iterations):
        item_bias = _side_bias(_minus_bias(base, user_bias, S.USER_IDX), S.ITEM_IDX, reg)
        user_bias = _side_bias(_minus_bias(base, item_bias, S.ITEM_IDX), S.USER_IDX, reg)
    return user_bias, item_bias


def residuals(ratings: DataFrame, *, mu: float, user_bias: DataFrame, item_bias: DataFrame) -> DataFrame:
    """``ratings`` with the rating replaced by ``r - mu - b_u - b_i``."""
    ub = user_bias.withColumnRenamed(S.BIAS, "_bu")
    ib = item_bias.withColumnRenamed(S.BIAS, "_bi")
    joined = ratings.join(ub, S.USER_IDX, "left").join(ib, S.ITEM_IDX, "left")
    resid = F.col(S.RATING) - mu - F.coalesce("_bu", F.lit(0.0)) - F.coalesce("_bi", F.lit(0.0))
    return joined.select(S.USER_IDX, S.ITEM_IDX, resid.alias(S.RATING))
