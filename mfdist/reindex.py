"""Stage 2, reindex: map arbitrary user/item ids to contiguous int indices, distributed and stable.

``user_index``: user_id (source type), user_idx int; likewise ``item_index``.
An id already in the previous run's index keeps its index; new ids get the next
indices. New ids are numbered in the order of a 64-bit hash of the id, so heavy
users and items land on random indices and ``idx mod d`` blocks stay balanced.
Numbering counts the sorted ids per partition (a number per partition reaches the
driver) and offsets each partition's rows, so no id ever goes through the driver.
"""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from mfdist import schema as S
from mfdist.errors import InputError

MAX_INDEX = 2**31 - 1


def _check_types(ids: DataFrame, existing: DataFrame, id_col: str, table: str) -> None:
    new_type, old_type = ids.schema[id_col].dataType, existing.schema[id_col].dataType
    if new_type != old_type:
        raise InputError(
            f"{table}: the published index has {id_col} of type {old_type.simpleString()} but the input's ids "
            f"are {new_type.simpleString()}; cast input.columns to the same type or use another output.root"
        )


def number_new_ids(new_ids: DataFrame, *, id_col: str, idx_col: str, offset: int) -> DataFrame:
    """Give ``new_ids`` (distinct) indices offset, offset+1, ... in hashed order.

    The sorted ids are cached, so the partition sizes counted (one small collect, a number
    per partition) are those of the rows numbered: index = the partition's start plus the
    row's position in it, which ``monotonically_increasing_id`` carries in its low 33 bits.
    """
    ordered = new_ids.orderBy(F.xxhash64(id_col), id_col).select(
        id_col, F.spark_partition_id().alias("_p"), F.monotonically_increasing_id().alias("_m")
    ).cache()
    sizes = dict(ordered.groupBy("_p").count().collect())
    starts, total = [], offset
    for part in range(max(sizes, default=-1) + 1):
        starts.append(total)
        total += sizes.get(part, 0)
    position = F.col("_m") - F.shiftleft(F.col("_p").cast("long"), 33)
    start = F.element_at(F.lit(starts or [offset]).cast("array<long>"), F.col("_p") + 1)
    return ordered.select(id_col, (start + position).cast(T.IntegerType()).alias(idx_col))


def build_index(ids: DataFrame, existing: DataFrame | None, *, id_col: str, idx_col: str, table: str) -> DataFrame:
    """The full index: ``existing`` plus the ids of ``ids`` it lacks, appended contiguously."""
    distinct = ids.select(id_col).where(F.col(id_col).isNotNull()).distinct()
    if existing is None:
        return number_new_ids(distinct, id_col=id_col, idx_col=idx_col, offset=0)
    existing = existing.select(id_col, F.col(idx_col).cast(T.IntegerType()))
    _check_types(distinct, existing, id_col, table)
    offset = existing.agg(F.max(idx_col)).first()[0]
    offset = 0 if offset is None else offset + 1
    new = distinct.join(existing, on=id_col, how="left_anti")
    appended = number_new_ids(new, id_col=id_col, idx_col=idx_col, offset=offset)
    return existing.unionByName(appended)


def check_capacity(index_size: int, table: str) -> None:
    if index_size > MAX_INDEX:
        raise InputError(f"{table}: {index_size} ids exceed the int index range ({MAX_INDEX})")


def apply_index(ratings: DataFrame, user_index: DataFrame, item_index: DataFrame, *, how: str = "inner") -> DataFrame:
    """Add user_idx and item_idx to ``ratings`` (``how='left'`` keeps unknown ids with null indices)."""
    return ratings.join(user_index, on=S.USER_ID, how=how).join(item_index, on=S.ITEM_ID, how=how)
