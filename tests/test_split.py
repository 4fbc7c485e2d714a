import pytest
from pyspark.sql import functions as F

from mfdist.split import split


@pytest.fixture(scope="module")
def ratings(spark):
    rows = [(u, i, float((u + i) % 5 + 1), 1_600_000_000 + u * 50 + i) for u in range(40) for i in range(25)]
    return spark.createDataFrame(rows, "user_idx int, item_idx int, rating double, s long").select(
        "user_idx", "item_idx", "rating", F.timestamp_seconds("s").alias("ts")
    ).cache()


def _keys(df):
    return {(r.user_idx, r.item_idx) for r in df.select("user_idx", "item_idx").collect()}


@pytest.mark.parametrize("method", ["random", "per_user", "temporal"])
def test_split_is_disjoint_complete_and_deterministic(ratings, method):
    train, test = split(ratings, method=method, test_fraction=0.2, seed=3)
    tr, te = _keys(train), _keys(test)
    assert not tr & te
    assert tr | te == _keys(ratings)
    assert 0.1 < len(te) / 1000 < 0.3
    again_train, again_test = split(ratings.repartition(5), method=method, test_fraction=0.2, seed=3)
    assert _keys(again_test) == te and _keys(again_train) == tr


def test_random_split_depends_on_seed(ratings):
    _, a = split(ratings, method="random", test_fraction=0.2, seed=1)
    _, b = split(ratings, method="random", test_fraction=0.2, seed=2)
    assert _keys(a) != _keys(b)


def test_per_user_keeps_every_user_in_train(ratings):
    train, test = split(ratings, method="per_user", test_fraction=0.2, seed=3)
    per_user = test.groupBy("user_idx").count().collect()
    assert {r["count"] for r in per_user} == {5}
    assert train.select("user_idx").distinct().count() == 40


def test_temporal_puts_the_latest_ratings_in_test(ratings):
    train, test = split(ratings, method="temporal", test_fraction=0.2, seed=3)
    assert train.agg(F.max("ts")).first()[0] < test.agg(F.min("ts")).first()[0]
