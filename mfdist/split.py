"""Stage 3, split: train/test as a deterministic function of ``run.seed``.

Methods (``split.method``):

- ``random``: each rating goes to test when a hash of (seed, user_idx, item_idx)
  falls under ``test_fraction``; independent of partitioning and retries.
- ``per_user``: each user's ratings ordered by that hash; the first
  ``round(n_u * test_fraction)`` go to test, so every user with >= 2 ratings
  keeps some in train.
- ``temporal``: ratings at or after the time quantile ``1 - test_fraction``
  (approxQuantile, a bounded action) go to test.
- ``file``: the test set is read from ``split.test_path``; the input is all train.
"""

from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from mfdist import schema as S
from mfdist.errors import InputError

_HASH_SCALE = float(2**63)


def unit_hash(seed: int) -> F.Column:
    """A uniform [0, 1) value per (seed, user_idx, item_idx)."""
    return F.abs(F.xxhash64(F.lit(seed), S.USER_IDX, S.ITEM_IDX).cast("double")) / _HASH_SCALE


def random_split(ratings: DataFrame, *, test_fraction: float, seed: int) -> tuple[DataFrame, DataFrame]:
    u = ratings.withColumn("_u", unit_hash(seed))
    return u.where(F.col("_u") >= test_fraction).drop("_u"), u.where(F.col("_u") < test_fraction).drop("_u")


def per_user_split(ratings: DataFrame, *, test_fraction: float, seed: int) -> tuple[DataFrame, DataFrame]:
    by_user = Window.partitionBy(S.USER_IDX)
    ordered = by_user.orderBy(unit_hash(seed), S.ITEM_IDX)
    ranked = ratings.withColumn("_rn", F.row_number().over(ordered)).withColumn(
        "_n_test", F.round(F.count(F.lit(1)).over(by_user) * test_fraction)
    )
    is_test = F.col("_rn") <= F.col("_n_test")
    return ranked.where(~is_test).drop("_rn", "_n_test"), ranked.where(is_test).drop("_rn", "_n_test")


def temporal_split(ratings: DataFrame, *, test_fraction: float) -> tuple[DataFrame, DataFrame]:
    seconds = ratings.where(F.col(S.TS).isNotNull()).select(F.unix_timestamp(S.TS).cast("double").alias("s"))
    cut = seconds.approxQuantile("s", [1.0 - test_fraction], 1e-4)
    if not cut:
        raise InputError("split.method=temporal: the input has no timestamps; set input.columns.timestamp")
    after = F.unix_timestamp(S.TS) >= cut[0]
    return ratings.where(F.col(S.TS).isNull() | ~after), ratings.where(after)


def split(ratings: DataFrame, *, method: str, test_fraction: float, seed: int) -> tuple[DataFrame, DataFrame]:
    """Train and test parts of indexed ratings for ``random``, ``per_user`` or ``temporal``."""
    if method == "random":
        return random_split(ratings, test_fraction=test_fraction, seed=seed)
    if method == "per_user":
        return per_user_split(ratings, test_fraction=test_fraction, seed=seed)
    if method == "temporal":
        return temporal_split(ratings, test_fraction=test_fraction)
    raise ValueError(f"split.method {method!r} is handled by the pipeline (file) or unknown")
