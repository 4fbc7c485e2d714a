"""Ranking metrics @K: a hand-computed example and agreement with pyspark's RankingEvaluator."""

import math

import numpy as np
import pytest
from pyspark.ml.evaluation import RankingEvaluator

from mfdist.evaluate import list_metrics, ranking_metrics, ranking_report, relevance_threshold, relevant_items

LISTS = "user_idx int, rank int, item_idx int, score float"
TEST = "user_idx int, item_idx int, rating double"
ALL = ["precision", "recall", "ndcg", "map", "coverage"]


def lists_frame(spark, lists):
    rows = [(u, r, i, float(-r)) for u, items in lists.items() for r, i in enumerate(items, start=1)]
    return spark.createDataFrame(rows, LISTS)


@pytest.fixture(scope="module")
def example(spark):
    # Items a..e = 0..4, x, y = 5, 6, z = 7, q = 8 (10 items in the catalogue).
    lists = {1: [0, 1, 2, 3], 2: [5, 6], 4: [0, 8]}
    test = [
        (1, 0, 5.0), (1, 2, 4.0), (1, 4, 4.5), (1, 1, 2.0),  # relevant a, c, e; b is not
        (2, 6, 5.0),  # relevant y
        (3, 7, 4.0),  # relevant z, but user 3 has no list
        (4, 3, 3.0),  # nothing relevant: user 4 is not averaged
    ]
    return lists_frame(spark, lists), spark.createDataFrame(test, TEST)


def test_hand_computed_example(example):
    lists, test = example
    got = ranking_report(lists, test, k=3, names=ALL, threshold=4.0, n_items=10, n_users=4)
    # user 1: hits at ranks 1 and 3 of 3 relevant; user 2: hit at rank 2 of 1; user 3: nothing.
    ndcg_1 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3) + 1 / math.log2(4))
    ndcg_2 = (1 / math.log2(3)) / 1
    want = {
        "precision@3": (2 / 3 + 1 / 3 + 0) / 3,
        "recall@3": (2 / 3 + 1 + 0) / 3,
        "ndcg@3": (ndcg_1 + ndcg_2 + 0) / 3,
        "map@3": ((1 / 1 + 2 / 3) / 3 + (1 / 2) / 1 + 0) / 3,
        "coverage@3": 6 / 10,  # a, b, c, x, y, q
        "full_lists@3": 1 / 4,  # only user 1 has 3 items
    }
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name] == pytest.approx(value), name


def test_only_the_configured_metrics_are_computed(example):
    lists, test = example
    got = ranking_report(lists, test, k=2, names=["rmse", "ndcg"], threshold=4.0, n_items=10, n_users=4)
    assert set(got) == {"ndcg@2"}
    assert ranking_metrics(lists, relevant_items(test, threshold=4.0), k=2, names=["coverage"]) == {}
    assert set(list_metrics(lists, k=2, n_items=10, n_users=4)) == {"coverage@2", "full_lists@2"}


def test_relevance_threshold_defaults_to_four_of_five_scaled_to_the_range():
    assert relevance_threshold(None, rating_range=[1.0, 5.0], implicit=False) == 4.0
    assert relevance_threshold(None, rating_range=[0.0, 10.0], implicit=False) == 7.5
    assert relevance_threshold(None, rating_range=[1.0, 5.0], implicit=True) is None
    assert relevance_threshold(3.5, rating_range=[1.0, 5.0], implicit=True) == 3.5


def test_implicit_relevance_counts_every_interaction(example):
    _, test = example
    assert relevant_items(test, threshold=None).count() == 7
    assert relevant_items(test, threshold=4.0).count() == 5


@pytest.mark.parametrize("k", [1, 3, 7])
def test_agrees_with_pyspark_ranking_evaluator(spark, k):
    rng = np.random.default_rng(k)
    n_items = 30
    lists = {u: rng.permutation(n_items)[: rng.integers(0, 9)].tolist() for u in range(40)}
    relevant = {u: rng.choice(n_items, size=rng.integers(1, 8), replace=False).tolist() for u in range(40)}
    test = spark.createDataFrame([(u, i, 5.0) for u, items in relevant.items() for i in items], TEST)
    got = ranking_metrics(lists_frame(spark, lists), relevant_items(test, threshold=4.0), k=k, names=ALL)
    pairs = spark.createDataFrame(
        [([float(i) for i in lists[u]], [float(i) for i in relevant[u]]) for u in range(40)],
        "prediction array<double>, label array<double>",
    )
    names = {"precision": "precisionAtK", "recall": "recallAtK", "ndcg": "ndcgAtK", "map": "meanAveragePrecisionAtK"}
    for ours, theirs in names.items():
        expected = RankingEvaluator(k=k, metricName=theirs, predictionCol="prediction", labelCol="label").evaluate(pairs)
        assert got[f"{ours}@{k}"] == pytest.approx(expected), ours
