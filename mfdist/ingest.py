"""Stage 1, ingest: read ratings, map columns, validate every row, resolve duplicates.

Output ``ratings``: user_id (source type; string for text formats), item_id,
rating double, ts timestamp (null when the input has none).
Output ``rejected``: user_id, item_id, rating, ts as the raw strings, reason.
``input_rows = accepted_rows + rejected_rows`` always holds: a duplicate that
the ``last`` policy supersedes is rejected with reason ``duplicate superseded``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from mfdist import lake
from mfdist import schema as S
from mfdist.config import ColumnsConfig, InputConfig
from mfdist.errors import InputError
from mfdist.synth import generate_ratings

log = logging.getLogger(__name__)

REASON_NULL_USER = "null user_id"
REASON_NULL_ITEM = "null item_id"
REASON_NAN = "rating not a number"
REASON_RANGE = "rating out of range"
REASON_TS = "bad timestamp"
REASON_DUPLICATE = "duplicate superseded"

_ORDER = "_order"
# MovieLens layouts: file name -> (separator, header, columns in file order).
_ML_FIELDS = ("userId", "movieId", "rating", "timestamp")
_ML_COLUMNS = ColumnsConfig(user="userId", item="movieId", rating="rating", timestamp="timestamp")


@dataclass(frozen=True)
class IngestResult:
    ratings: DataFrame
    rejected: DataFrame
    input_rows: int
    accepted_rows: int
    rejected_rows: int
    cached: DataFrame | None = None  # what ``ratings`` is read from, when that is a cache

    def release(self) -> None:
        """Drop the ratings' cache once later stages have their own copy (the rejected rows stay for publishing)."""
        if self.cached is not None:
            self.cached.unpersist()


def _require_path(spark: SparkSession, path: str) -> None:
    if not lake.FileSystem(spark, path).exists(path):
        raise InputError(f"input path not found: {path}")


def _read_delimited(spark: SparkSession, path: str, *, sep: str, header: bool, names: tuple[str, ...] | None) -> DataFrame:
    """Read a text table with every column as a string (validation does the typing)."""
    df = spark.read.csv(path, sep=sep, header=header, inferSchema=False, mode="PERMISSIVE")
    return df.toDF(*names) if names else df


def _read_double_colon(spark: SparkSession, path: str) -> DataFrame:
    """MovieLens 1M/10M `ratings.dat`: `user::item::rating::timestamp`."""
    parts = F.split(F.col("value"), "::")
    return spark.read.text(path).select(*[parts.getItem(i).alias(n) for i, n in enumerate(_ML_FIELDS)])


def movielens_file(spark: SparkSession, path: str) -> str:
    """The ratings file of a MovieLens folder (u.data, ratings.dat, ratings.csv) or the file itself."""
    fs = lake.FileSystem(spark, path)
    if fs.is_dir(path):
        for name in ("u.data", "ratings.dat", "ratings.csv"):
            if fs.is_file(f"{path.rstrip('/')}/{name}"):
                return f"{path.rstrip('/')}/{name}"
        raise InputError(f"input.path {path}: no u.data, ratings.dat or ratings.csv in this MovieLens folder")
    return path


def read_movielens(spark: SparkSession, path: str) -> DataFrame:
    """Read any MovieLens ratings layout to columns userId, movieId, rating, timestamp (strings)."""
    file = movielens_file(spark, path)
    if file.endswith(".dat"):
        return _read_double_colon(spark, file)
    if file.endswith(".csv"):
        return _read_delimited(spark, file, sep=",", header=True, names=None).select(*_ML_FIELDS)
    return _read_delimited(spark, file, sep="\t", header=False, names=_ML_FIELDS)


def read_source(spark: SparkSession, cfg: InputConfig, path: str | None) -> tuple[DataFrame, ColumnsConfig]:
    """Read ``path`` in ``cfg.format``; return the frame and the column mapping to apply."""
    fmt = cfg.format
    if fmt == "synthetic":
        return generate_ratings(spark, cfg=cfg.synthetic, rating_range=cfg.rating_range), ColumnsConfig(timestamp=S.TS)
    assert path is not None
    if fmt == "table":
        if not spark.catalog.tableExists(path):
            raise InputError(f"input.path: table {path} not found in the catalog")
        return spark.read.table(path), cfg.columns
    _require_path(spark, path)
    if fmt == "parquet":
        return spark.read.parquet(path), cfg.columns
    if fmt == "delta":
        lake.require_delta(spark, "input.format")
        return spark.read.format("delta").load(path), cfg.columns
    if fmt == "movielens":
        return read_movielens(spark, path), _ML_COLUMNS
    sep = "," if fmt == "csv" else "\t"
    return _read_delimited(spark, path, sep=sep, header=cfg.header, names=None), cfg.columns


def map_columns(df: DataFrame, columns: ColumnsConfig, source: str) -> DataFrame:
    """Select the configured columns as user_id, item_id, rating, ts (ts null when not configured)."""
    wanted = {S.USER_ID: columns.user, S.ITEM_ID: columns.item, S.RATING: columns.rating}
    if columns.timestamp:
        wanted[S.TS] = columns.timestamp
    for target, name in wanted.items():
        if name not in df.columns:
            key = {S.USER_ID: "user", S.ITEM_ID: "item", S.RATING: "rating", S.TS: "timestamp"}[target]
            raise InputError(
                f"input.columns.{key}: column {name!r} not in {source} (columns: {', '.join(df.columns)})"
            )
    cols = [F.col(name).alias(target) for target, name in wanted.items()]
    if not columns.timestamp:
        cols.append(F.lit(None).cast(T.StringType()).alias(S.TS))
    return df.select(*cols)


def _clean_id(c: Column, dtype: T.DataType) -> Column:
    """Strings are trimmed and an empty string counts as null."""
    if isinstance(dtype, T.StringType):
        trimmed = F.trim(c)
        return F.when(trimmed != "", trimmed)
    return c


def _parse_ts(c: Column, dtype: T.DataType) -> Column:
    """Timestamps as epoch seconds (numbers or numeric strings) or ISO-8601 strings."""
    if isinstance(dtype, (T.TimestampType, T.TimestampNTZType, T.DateType)):
        return c.cast(T.TimestampType())
    if isinstance(dtype, T.NumericType):
        return F.timestamp_seconds(c)
    text = F.trim(c.cast(T.StringType()))
    seconds = text.try_cast(T.LongType())
    return F.coalesce(F.timestamp_seconds(seconds), F.try_to_timestamp(text))


def validate(df: DataFrame, *, rating_range: list[float]) -> DataFrame:
    """Add typed columns and a ``reason`` (null for a good row) to mapped raw ratings.

    The raw columns are kept in their source types (``raw_*``): only the rows that end up in
    ``rejected_ratings`` are ever formatted as strings.
    """
    types = dict(df.dtypes)
    schema = {f.name: f.dataType for f in df.schema.fields}
    lo, hi = rating_range
    rating = F.col(S.RATING).try_cast(T.DoubleType()) if types[S.RATING] != "double" else F.col(S.RATING)
    typed = df.select(
        *[F.col(c).alias(f"raw_{c}") for c in S.RAW_COLUMNS],
        _clean_id(F.col(S.USER_ID), schema[S.USER_ID]).alias(S.USER_ID),
        _clean_id(F.col(S.ITEM_ID), schema[S.ITEM_ID]).alias(S.ITEM_ID),
        rating.alias(S.RATING),
        _parse_ts(F.col(S.TS), schema[S.TS]).alias(S.TS),
        F.monotonically_increasing_id().alias(_ORDER),
    )
    reason = (
        F.when(F.col(S.USER_ID).isNull(), REASON_NULL_USER)
        .when(F.col(S.ITEM_ID).isNull(), REASON_NULL_ITEM)
        .when(F.col(S.RATING).isNull() | F.isnan(S.RATING), REASON_NAN)
        .when((F.col(S.RATING) < lo) | (F.col(S.RATING) > hi), REASON_RANGE)
        .when(F.col("raw_ts").isNotNull() & F.col(S.TS).isNull(), REASON_TS)
    )
    return typed.withColumn(S.REASON, reason)


def _raw_strings(rows: DataFrame, reason: Column) -> DataFrame:
    """``rows``' raw columns as strings, with ``reason``: rows of ``rejected_ratings``."""
    return rows.select(*[F.col(f"raw_{c}").cast(T.StringType()).alias(c) for c in S.RAW_COLUMNS], reason.alias(S.REASON))


def rejected_rows(validated: DataFrame) -> DataFrame:
    """The raw columns as strings plus the reason, for rows that failed validation."""
    return _raw_strings(validated.where(F.col(S.REASON).isNotNull()), F.col(S.REASON))


def count_by_reason(rejected: DataFrame, *, total: int) -> dict[str, int]:
    """Rejected rows per reason (a handful of rows: one per reason); ``total``, their known count, 0 spares the job."""
    # The rejected rows are a plan over the input, so counting them re-reads it.
    if not total:
        return {}
    return {r[S.REASON]: r["count"] for r in rejected.groupBy(S.REASON).count().collect()}


def resolve_duplicates(accepted: DataFrame, *, policy: str) -> tuple[DataFrame, DataFrame | None]:
    """Apply ``input.duplicates`` to rows with repeated pairs; return one row per (user, item) and, for
    ``last``, the rows it supersedes.

    ``last`` keeps a pair's newest row (the later input row on equal timestamps) by an
    aggregation, not a sort; the superseded rows are found by joining back only the pairs
    that occur more than once.
    """
    key = [S.USER_ID, S.ITEM_ID]
    if policy == "mean":
        merged = accepted.groupBy(*key).agg(F.avg(S.RATING).alias(S.RATING), F.max(S.TS).alias(S.TS))
        return merged, None
    if policy == "error":
        u, i, n = accepted.groupBy(*key).count().where("count > 1").first()
        raise InputError(
            f"input.duplicates=error: ({S.USER_ID}={u}, {S.ITEM_ID}={i}) occurs {n} times; set input.duplicates to last or mean"
        )
    # A null timestamp orders first in a struct, so the newest timestamped row wins, then the later row.
    newest = F.max_by(F.struct(S.RATING, S.TS, _ORDER), F.struct(S.TS, _ORDER)).alias("_w")
    grouped = accepted.groupBy(*key).agg(F.count(F.lit(1)).alias("_n"), newest)
    kept = grouped.select(*key, F.col(f"_w.{S.RATING}").alias(S.RATING), F.col(f"_w.{S.TS}").alias(S.TS))
    winners = grouped.where("_n > 1").select(*key, F.col(f"_w.{_ORDER}").alias("_keep"))
    superseded = accepted.join(winners, key).where(F.col(_ORDER) != F.col("_keep"))
    return kept, _raw_strings(superseded, F.lit(REASON_DUPLICATE))


def row_counts(validated: DataFrame, *, distinct_pairs: bool) -> tuple[int, int, int | None]:
    """Rows read, invalid rows and, when ``distinct_pairs``, the distinct (user, item) pairs among the valid rows.

    One job: the pairs come from the hash aggregation that counts the rows (rows and invalid rows
    per pair; a pair is valid when not all its rows are invalid), so the input is scanned once.
    """
    rows, bad = F.count(F.lit(1)).alias("n"), F.count(S.REASON).alias("bad")
    if not distinct_pairs:
        found = validated.agg(rows, bad).first()
        return int(found["n"]), int(found["bad"]), None
    per_pair = validated.groupBy(S.USER_ID, S.ITEM_ID).agg(rows, bad)
    found = per_pair.agg(F.sum("n").alias("n"), F.sum("bad").alias("bad"), F.count_if(F.col("n") > F.col("bad")).alias("pairs")).first()
    return int(found["n"] or 0), int(found["bad"] or 0), int(found["pairs"] or 0)


# Formats whose rows are cheaper to read again than to cache (a columnar scan of four columns): their
# ratings are re-read by each later use; text and generated sources are parsed or drawn once and cached.
_RESCANNED = {"parquet", "delta", "table"}


def _parsed_once(validated: DataFrame) -> DataFrame:
    """``validated`` cached, its raw columns kept only for rejected rows (the only rows that show them)."""
    bad = F.col(S.REASON).isNotNull()
    raw = [F.when(bad, F.col(f"raw_{c}")).alias(f"raw_{c}") for c in S.RAW_COLUMNS]
    return validated.select(*raw, *[c for c in validated.columns if not c.startswith("raw_")]).cache()


def ingest(spark: SparkSession, cfg: InputConfig, *, path: str | None = None) -> IngestResult:
    """Read, validate and de-duplicate ``path`` (default ``cfg.path``); counts are Spark actions.

    Repeated pairs are looked for by counting the distinct pairs in the job that counts the
    rows (:func:`row_counts`); only a set that has some pays for resolving them. A text or generated source
    is validated once into a cache that the counts, the ratings and the invalid rows read (a
    set with repeated pairs reads it again to resolve them); the rejected rows are cached when
    there are any.
    """
    source = path if path is not None else cfg.path
    raw, columns = read_source(spark, cfg, source)
    full = validate(map_columns(raw, columns, source or "synthetic ratings"), rating_range=cfg.rating_range)
    parsed = _parsed_once(full) if cfg.format not in _RESCANNED else None
    validated = parsed if parsed is not None else full
    # Generated ratings are de-duplicated as they are drawn (mfdist.synth).
    input_rows, invalid, pairs = row_counts(validated, distinct_pairs=cfg.format != "synthetic")
    if input_rows == invalid:
        raise InputError(f"input.path {source or 'synthetic'}: no valid ratings ({input_rows} rows read, all rejected)")
    accepted = validated.where(F.col(S.REASON).isNull())
    ratings = accepted.select(S.USER_ID, S.ITEM_ID, S.RATING, S.TS)
    unique = input_rows - invalid if pairs is None else pairs
    rejected, n_superseded = rejected_rows(validated), 0
    resolved = unique < input_rows - invalid
    if resolved:
        # Superseded rows show their raw columns, which the parsed cache keeps only for invalid rows.
        ratings, superseded = resolve_duplicates(full.where(F.col(S.REASON).isNull()), policy=cfg.duplicates)
        ratings = ratings.cache()
        ratings.count()
        if superseded is not None:
            rejected, n_superseded = rejected.unionByName(superseded), input_rows - invalid - unique
    if invalid + n_superseded:
        rejected = rejected.cache()
        rejected.count()
    else:
        rejected = spark.createDataFrame([], S.REJECTED_SCHEMA)
    if resolved and parsed is not None:
        parsed.unpersist()  # the resolved ratings and the rejected rows have caches of their own
    cached = ratings if resolved else parsed
    accepted_rows = input_rows - invalid - n_superseded
    log.info("ingest: %d rows read, %d accepted, %d rejected", input_rows, accepted_rows, invalid + n_superseded)
    return IngestResult(ratings, rejected, input_rows, accepted_rows, invalid + n_superseded, cached)
