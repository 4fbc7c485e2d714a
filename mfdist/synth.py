"""Distributed synthetic ratings with a planted low-rank model (the embedded default input).

Every value is a hash of (seed, row id) or (seed, user/item, k), so the data is a
deterministic function of the config and is generated inside Spark tasks: no
driver-side array of users, items or ratings exists.

Model: ``r = mu + b_u + b_i + s * p_u . q_i / sqrt(rank) + noise``, clipped to
``rating_range``; users and items are drawn from truncated power laws (Zipf-like
activity and popularity). Output columns: user_id long, item_id long,
rating double, ts timestamp. Duplicate (user, item) draws keep the first row id.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from mfdist import schema as S
from mfdist.config import SyntheticConfig
from mfdist.hashing import splitmix64

# Power-law exponents of the inverse CDF u = n * x**gamma: the top 1% of items get
# about 16% of the ratings, the top 1% of users about 6% (MovieLens-like skew).
ITEM_GAMMA = 2.5
USER_GAMMA = 1.67
SIGNAL = 0.8
USER_BIAS_STD = 0.3
ITEM_BIAS_STD = 0.4
_TS0 = 1_600_000_000
_TS_SPAN = 100_000_000

def _uniform(seed: int, stream: int, ids: np.ndarray) -> np.ndarray:
    """Uniform (0, 1) doubles from (seed, stream, id)."""
    with np.errstate(over="ignore"):
        key = splitmix64(np.uint64(seed) * np.uint64(1_000_003) + np.uint64(stream))
        h = splitmix64(ids.astype(np.uint64) ^ key)
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def _normal(seed: int, stream: int, ids: np.ndarray) -> np.ndarray:
    """Standard normal draws from (seed, stream, id) by Box-Muller."""
    u1 = _uniform(seed, 2 * stream, ids)
    u2 = _uniform(seed, 2 * stream + 1, ids)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def planted_factors(seed: int, side: int, ids: np.ndarray, rank: int) -> np.ndarray:
    """The planted latent factors of users (side 0) or items (side 1), shape (len(ids), rank)."""
    grid = ids.astype(np.int64)[:, None] * rank + np.arange(rank)[None, :]
    return _normal(seed, 10 + side, grid.ravel()).reshape(len(ids), rank)


def planted_biases(seed: int, side: int, ids: np.ndarray) -> np.ndarray:
    """The planted biases of users (side 0) or items (side 1)."""
    std = USER_BIAS_STD if side == 0 else ITEM_BIAS_STD
    return std * _normal(seed, 20 + side, ids)


def planted_pairs(cfg: SyntheticConfig, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (user, item) pair each row id draws."""
    users = np.minimum((cfg.users * _uniform(cfg.seed, 1, row_ids) ** USER_GAMMA).astype(np.int64), cfg.users - 1)
    items = np.minimum((cfg.items * _uniform(cfg.seed, 2, row_ids) ** ITEM_GAMMA).astype(np.int64), cfg.items - 1)
    return users, items


def planted_ratings(cfg: SyntheticConfig, rating_range: list[float], row_ids: np.ndarray, users: np.ndarray,
                    items: np.ndarray) -> pd.DataFrame:
    """The ratings of the given row ids, which drew ``users`` and ``items`` (a pure function, used inside Spark tasks)."""
    lo, hi = rating_range
    scale = (hi - lo) / 4.0
    # Drawn once per distinct id of the batch (popular ids repeat in most rows), then gathered per row.
    u, u_row = np.unique(users, return_inverse=True)
    i, i_row = np.unique(items, return_inverse=True)
    p, q = planted_factors(cfg.seed, 0, u, cfg.rank), planted_factors(cfg.seed, 1, i, cfg.rank)
    dot = np.einsum("ij,ij->i", p[u_row], q[i_row]) / np.sqrt(cfg.rank)
    mean = lo + 0.625 * (hi - lo)
    biases = planted_biases(cfg.seed, 0, u)[u_row] + planted_biases(cfg.seed, 1, i)[i_row]
    rating = mean + scale * (biases + SIGNAL * dot) + cfg.noise * scale * _normal(cfg.seed, 3, row_ids)
    ts = _TS0 + (_uniform(cfg.seed, 4, row_ids) * _TS_SPAN).astype(np.int64)
    return pd.DataFrame(
        {
            S.USER_ID: users,
            S.ITEM_ID: items,
            S.RATING: np.clip(rating, lo, hi),
            S.TS: pd.to_datetime(ts, unit="s", utc=True),
        }
    )


_PAIR_SCHEMA = "id long, user_id long, item_id long"
_ROW_SCHEMA = T.StructType(
    [
        T.StructField(S.USER_ID, T.LongType()),
        T.StructField(S.ITEM_ID, T.LongType()),
        T.StructField(S.RATING, T.DoubleType()),
        T.StructField(S.TS, T.TimestampType()),
    ]
)


def generate_ratings(
    spark: SparkSession, *, cfg: SyntheticConfig, rating_range: list[float], partitions: int | None = None
) -> DataFrame:
    """A DataFrame of about ``cfg.ratings`` planted ratings (fewer when draws repeat a pair).

    Only the pairs are drawn before the de-duplication, which keeps each pair's first row id by
    a hash aggregation of three longs; a rating is a function of its row id and pair, so it is
    computed after, for the kept rows alone.
    """
    n_parts = partitions or max(spark.sparkContext.defaultParallelism, cfg.ratings // 2_000_000, 1)

    def draw(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            ids = batch["id"].to_numpy()
            users, items = planted_pairs(cfg, ids)
            yield pd.DataFrame({"id": ids, S.USER_ID: users, S.ITEM_ID: items})

    def rate(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            yield planted_ratings(cfg, rating_range, *(batch[c].to_numpy() for c in ("id", S.USER_ID, S.ITEM_ID)))

    pairs = spark.range(0, cfg.ratings, numPartitions=n_parts).mapInPandas(draw, _PAIR_SCHEMA)
    first = pairs.groupBy(S.USER_ID, S.ITEM_ID).agg(F.min("id").alias("id"))
    return first.mapInPandas(rate, _ROW_SCHEMA)
