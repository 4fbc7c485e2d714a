from pyspark.sql import functions as F

from mfdist.reindex import apply_index, build_index


def _build(spark, ids, existing=None, dtype="string"):
    df = spark.createDataFrame([(i,) for i in ids], f"user_id {dtype}")
    return build_index(df, existing, id_col="user_id", idx_col="user_idx", table="user_index")


def _as_dict(index):
    return {r.user_id: r.user_idx for r in index.collect()}


def test_indices_are_contiguous_unique_and_hashed(spark):
    ids = [f"u{i}" for i in range(200)] * 2
    index = _as_dict(_build(spark, ids))
    assert sorted(index.values()) == list(range(200))
    assert len(set(index)) == 200
    # Hashed order: the index is not the id's sort order.
    assert [index[f"u{i}"] for i in range(10)] != sorted(index[f"u{i}"] for i in range(10))


def test_same_ids_get_same_indices_on_rebuild(spark):
    ids = [f"u{i}" for i in range(50)]
    assert _as_dict(_build(spark, ids)) == _as_dict(_build(spark, list(reversed(ids))))


def test_incremental_append_keeps_old_indices(spark):
    first = _build(spark, ["a", "b", "c"]).cache()
    second = _as_dict(_build(spark, ["c", "d", "a", "e"], existing=first))
    old = _as_dict(first)
    assert all(second[k] == v for k, v in old.items())
    assert sorted(second.values()) == list(range(5))
    assert {second["d"], second["e"]} == {3, 4}


def test_long_ids_keep_their_type(spark):
    index = _build(spark, [1 << 40, 5, 1 << 62], dtype="long")
    assert dict(index.dtypes) == {"user_id": "bigint", "user_idx": "int"}
    assert sorted(_as_dict(index).values()) == [0, 1, 2]


def test_apply_index_left_keeps_unknown_ids(spark):
    users = _build(spark, ["a"])
    items = build_index(spark.createDataFrame([("x",)], "item_id string"), None, id_col="item_id", idx_col="item_idx", table="item_index")
    ratings = spark.createDataFrame([("a", "x", 1.0), ("zz", "x", 2.0)], "user_id string, item_id string, rating double")
    out = apply_index(ratings, users, items, how="left")
    assert out.where(F.col("user_idx").isNull()).count() == 1
