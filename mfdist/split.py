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
TEST = "_test"


def unit_hash(seed: int) -> F.Column:
    """A uniform [0, 1) value per (seed, user_idx, item_idx)."""
    return F.abs(F.xxhash64(F.lit(seed), S.USER_IDX, S.ITEM_IDX).cast("double")) / _HASH_SCALE


def parts(labeled: DataFrame) -> tuple[DataFrame, DataFrame]:
    """The train and test rows of ``labeled`` (by its TEST column), without that column."""
    return labeled.where(~F.col(TEST)).drop(TEST), labeled.where(F.col(TEST)).drop(TEST)


def random_split(ratings: DataFrame, *, test_fraction: float, seed: int) -> tuple[DataFrame, DataFrame]:
    return parts(ratings.withColumn(TEST, unit_hash(seed) < test_fraction))


def _per_user_test(ratings: DataFrame, *, test_fraction: float, seed: int) -> DataFrame:
    by_user = Window.partitionBy(S.USER_IDX)
    ordered = by_user.orderBy(unit_hash(seed), S.ITEM_IDX)
    n_test = F.round(F.count(F.lit(1)).over(by_user) * test_fraction)
    return ratings.withColumn(TEST, F.row_number().over(ordered) <= n_test)


def _temporal_test(ratings: DataFrame, *, test_fraction: float) -> DataFrame:
    seconds = ratings.where(F.col(S.TS).isNotNull()).select(F.unix_timestamp(S.TS).cast("double").alias("s"))
    cut = seconds.approxQuantile("s", [1.0 - test_fraction], 1e-4)
    if not cut:
        raise InputError("split.method=temporal: the input has no timestamps; set input.columns.timestamp")
    return ratings.withColumn(TEST, F.coalesce(F.unix_timestamp(S.TS) >= cut[0], F.lit(False)))


def label(ratings: DataFrame, *, method: str, test_fraction: float, seed: int) -> DataFrame:
    """Indexed ratings with a boolean TEST column for ``random``, ``per_user`` or ``temporal``.

    One frame for both parts, so a caller caches and counts it once (:func:`parts` cuts it).
    """
    if method == "random":
        return ratings.withColumn(TEST, unit_hash(seed) < test_fraction)
    if method == "per_user":
        return _per_user_test(ratings, test_fraction=test_fraction, seed=seed)
    if method == "temporal":
        return _temporal_test(ratings, test_fraction=test_fraction)
    raise ValueError(f"split.method {method!r} is handled by the pipeline (file) or unknown")


def split(ratings: DataFrame, *, method: str, test_fraction: float, seed: int) -> tuple[DataFrame, DataFrame]:
    """Train and test parts of indexed ratings for ``random``, ``per_user`` or ``temporal``."""
    return parts(label(ratings, method=method, test_fraction=test_fraction, seed=seed))
