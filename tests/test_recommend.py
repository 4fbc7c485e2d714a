"""The blocked top-K (mfdist.topk), recommendations and similar items against brute-force numpy; the stage and its rerun."""

import dataclasses

import numpy as np
import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F

from mfdist import lake
from mfdist import recommend as R
from mfdist import schema as S
from mfdist import topk as K
from mfdist.config import load_config
from mfdist.errors import ConfigError
from mfdist.model import Model

# ---------------------------------------------------------------- brute force


def brute_top_k(queries, cands, excluded, k, cand_ids=None):
    """Per query: [(id, score)] of the best k by (score desc, id asc), excluded ids skipped, in float64."""
    cand_ids = np.arange(len(cands)) if cand_ids is None else np.asarray(cand_ids)
    scores = np.asarray(queries, np.float64) @ np.asarray(cands, np.float64).T
    lists = []
    for row, skip in zip(scores, excluded):
        keep = ~np.isin(cand_ids, list(skip))
        ids, vals = cand_ids[keep], row[keep]
        order = np.lexsort((ids, -vals))[:k]
        lists.append([(int(ids[j]), float(vals[j])) for j in order])
    return lists


def kernel_lists(vals, ids):
    return [[(int(i), float(v)) for i, v in zip(ri, rv) if v > -np.inf] for ri, rv in zip(ids, vals)]


def run_kernel(queries, cands, excluded, k, block):
    ex_rows = np.repeat(np.arange(len(excluded)), [len(e) for e in excluded])
    ex_ids = np.array([i for e in excluded for i in sorted(e)], np.int32)
    ids = np.arange(len(cands), dtype=np.int32)
    blocks = [(ids[s : s + block], cands[s : s + block]) for s in range(0, len(cands), block)]
    return kernel_lists(*K.top_k(queries.astype(np.float32), ex_rows, ex_ids, blocks, k))


def integer_factors(rng, n, d):
    """Small integer vectors: exact float arithmetic and many exactly tied scores."""
    return rng.integers(-2, 3, (n, d)).astype(np.float32)


# ---------------------------------------------------------------- the numpy kernel


@pytest.mark.parametrize("block", [1, 3, 7, 64])
@pytest.mark.parametrize("k", [1, 5, 12])
def test_kernel_matches_brute_force_with_ties_and_exclusions(block, k):
    rng = np.random.default_rng(block * 100 + k)
    queries, cands = integer_factors(rng, 40, 3), integer_factors(rng, 30, 3)
    # Some rows exclude nothing, some almost every candidate, one all of them.
    excluded = [set(rng.choice(30, size=n, replace=False).tolist()) for n in rng.integers(0, 31, 39)] + [set(range(30))]
    excluded[0], excluded[1] = set(), set(range(29))
    assert run_kernel(queries, cands, excluded, k, block) == brute_top_k(queries, cands, excluded, k)


def test_kernel_on_random_floats_with_a_sample_bound():
    rng = np.random.default_rng(3)
    queries = rng.standard_normal((200, 8)).astype(np.float32)
    cands = rng.standard_normal((5000, 8)).astype(np.float32)
    excluded = [set(rng.choice(5000, size=20, replace=False).tolist()) for _ in range(200)]
    got = run_kernel(queries, cands, excluded, 10, 2500)  # blocks wider than SAMPLE use the sample bound
    want = brute_top_k(queries, cands, excluded, 10)
    assert [[i for i, _ in row] for row in got] == [[i for i, _ in row] for row in want]
    np.testing.assert_allclose([v for row in got for _, v in row], [v for row in want for _, v in row], rtol=1e-5)


def test_merge_ranks_zero_and_negative_zero_as_a_tie_by_id():
    vals, ids = np.full((1, 3), -np.inf, np.float32), np.full((1, 3), K.NO_ID, np.int32)
    cand_vals = np.array([-0.0, 0.0, 0.0], np.float32)
    vals, ids = K._merge(vals, ids, np.zeros(3, np.int64), cand_vals, np.array([0, 1, 2], np.int32))
    assert ids.tolist() == [[0, 1, 2]] and vals.tolist() == [[0.0, 0.0, 0.0]]


# ---------------------------------------------------------------- the Spark top-K: both paths


def frames(spark, queries, cands, excluded):
    q = spark.createDataFrame(
        [(i, v.tolist(), sorted(int(x) for x in e)) for i, (v, e) in enumerate(zip(queries, excluded))],
        "_q int, _vec array<float>, _exclude array<int>",
    )
    c = spark.createDataFrame([(i, v.tolist()) for i, v in enumerate(cands)], "_c int, _vec array<float>")
    return q, c


def as_lists(df, k):
    rows = sorted(df.collect(), key=lambda r: (r._q, r.rank))
    lists = {}
    for r in rows:
        lists.setdefault(r._q, []).append((r._c, float(r.score)))
    assert all([r.rank for r in rows if r._q == q] == list(range(1, len(v) + 1)) for q, v in lists.items())
    assert all(len(v) <= k for v in lists.values())
    return lists


@pytest.fixture(scope="module")
def tied_case(spark):
    rng = np.random.default_rng(11)
    queries, cands = integer_factors(rng, 37, 4), integer_factors(rng, 23, 4)
    excluded = [set(rng.choice(23, size=n, replace=False).tolist()) for n in rng.integers(0, 24, 37)]
    excluded[0] = set(range(23))
    excluded[1] = set(range(21))
    return queries, cands, excluded, frames(spark, queries, cands, excluded)


@pytest.mark.parametrize("broadcast_max_mb", [64, 0], ids=["broadcast", "block_join"])
def test_top_k_lists_match_brute_force(tied_case, broadcast_max_mb):
    queries, cands, excluded, (q, c) = tied_case
    blocks = K.Blocks(queries=8, candidates=5, join_queries=16, join_candidates=10)
    got = R.top_k_lists(q, c, k=6, broadcast_max_mb=broadcast_max_mb, blocks=blocks)
    want = {i: row for i, row in enumerate(brute_top_k(queries, cands, excluded, 6)) if row}
    assert as_lists(got, 6) == want
    assert 0 not in want and len(want[1]) == 2


def test_block_join_with_a_query_group_left_empty(tied_case):
    queries, cands, excluded, (q, c) = tied_case
    # Even ids only, in as many query groups as cores (2): the odd group meets the candidates alone.
    got = R.top_k_lists(q.where("_q % 2 = 0"), c, k=3, broadcast_max_mb=0, blocks=K.Blocks(join_queries=1000))
    want = {i: row for i, row in enumerate(brute_top_k(queries, cands, excluded, 3)) if row and i % 2 == 0}
    assert as_lists(got, 3) == want


def test_broadcast_and_block_join_give_identical_lists(tied_case):
    _, _, _, (q, c) = tied_case
    blocks = K.Blocks(queries=4, candidates=3, join_queries=9, join_candidates=8)
    broadcast = R.top_k_lists(q, c, k=4, broadcast_max_mb=64, blocks=blocks)
    block_join = R.top_k_lists(q, c, k=4, broadcast_max_mb=0, blocks=blocks)
    assert_df_equality(broadcast, block_join, ignore_row_order=True, ignore_nullable=True)


def test_top_k_lists_with_k_zero_is_empty_with_the_schema(tied_case):
    _, _, _, (q, c) = tied_case
    empty = R.top_k_lists(q, c, k=0, broadcast_max_mb=64)
    assert empty.count() == 0 and empty.schema == R.LIST_SCHEMA


# ---------------------------------------------------------------- users and items


@pytest.fixture(scope="module")
def model_case(spark):
    rng = np.random.default_rng(5)
    n_users, n_items, rank = 12, 9, 3
    p, q = rng.standard_normal((n_users, rank)), rng.standard_normal((n_items, rank))
    bu, bi = rng.standard_normal(n_users), rng.standard_normal(n_items)
    q[4] = 0.0  # a zero item vector: cosine 0 with everything
    users = spark.createDataFrame(
        [(u, float(bu[u]), p[u].tolist()) for u in range(n_users)], S.MODEL_SCHEMA_USERS
    ).cache()
    items = spark.createDataFrame([(i, float(bi[i]), q[i].tolist()) for i in range(n_items)], S.MODEL_SCHEMA_ITEMS).cache()
    model = Model(mu=3.5, users=users, items=items, rank=rank)
    # User 0 has seen all but two items; user 11 has factors but no training ratings.
    seen = {0: set(range(2, n_items)), **{u: set(rng.choice(n_items, size=3, replace=False).tolist()) for u in range(1, 11)}}
    train = spark.createDataFrame(
        [(u, i, 4.0) for u, items_ in seen.items() for i in sorted(items_)], "user_idx int, item_idx int, rating double"
    ).cache()
    return model, train, seen, (p, q, bu, bi)


def test_user_lists_score_with_biases_and_exclude_seen_items(model_case):
    model, train, seen, (p, q, bu, bi) = model_case
    got = R.user_lists(model, R.seen_items(train), k=4, broadcast_max_mb=64)
    full = np.hstack([p, bu[:, None], np.ones((len(p), 1))])
    item = np.hstack([q, np.ones((len(q), 1)), bi[:, None] + model.mu])
    want = brute_top_k(full[list(seen)], item, list(seen.values()), 4)
    lists = as_lists(got.withColumnRenamed("user_idx", "_q").withColumnRenamed("item_idx", "_c"), 4)
    assert sorted(lists) == sorted(seen)  # user 11 has no training ratings: no list
    assert len(lists[0]) == 2 and {i for i, _ in lists[0]} == {0, 1}
    for user, row in zip(seen, want):
        assert [i for i, _ in lists[user]] == [i for i, _ in row]
        np.testing.assert_allclose([s for _, s in lists[user]], [s for _, s in row], rtol=1e-5)


def test_user_lists_dot_only_lists_every_user_without_exclusion(model_case):
    model, _, _, (p, q, _, _) = model_case
    got = R.user_lists(model, None, k=3, broadcast_max_mb=64, biases=False)
    lists = as_lists(got.withColumnRenamed("user_idx", "_q").withColumnRenamed("item_idx", "_c"), 3)
    want = brute_top_k(p, q, [set()] * len(p), 3)
    assert [[i for i, _ in lists[u]] for u in range(len(p))] == [[i for i, _ in row] for row in want]


def test_similar_items_are_cosine_neighbours_without_self(model_case):
    model, _, _, (_, q, _, _) = model_case
    got = R.similar_item_lists(model.items, k=3, broadcast_max_mb=64)
    norms = np.linalg.norm(q, axis=1, keepdims=True)
    unit = np.divide(q, norms, out=np.zeros_like(q), where=norms > 0)
    want = brute_top_k(unit, unit, [{i} for i in range(len(q))], 3)
    lists = as_lists(got.toDF("_q", "rank", "_c", "score"), 3)
    for item, row in enumerate(want):
        assert [i for i, _ in lists[item]] == [i for i, _ in row]
        np.testing.assert_allclose([s for _, s in lists[item]], [s for _, s in row], rtol=1e-5, atol=1e-6)
    assert [s for _, s in lists[4]] == [0.0, 0.0, 0.0] and [i for i, _ in lists[4]] == [0, 1, 2]


def indexes(spark, n_users, n_items):
    users = spark.createDataFrame([(f"u{u}", u) for u in range(n_users)], "user_id string, user_idx int")
    items = spark.createDataFrame([(f"i{i}", i) for i in range(n_items)], "item_id string, item_idx int")
    return users, items


@pytest.mark.parametrize("popular", [False, True])
def test_recommend_cold_users_get_no_list_or_a_popularity_list(spark, model_case, popular):
    model, train, seen, _ = model_case
    user_index, item_index = indexes(spark, 14, 9)  # users 11..13 have no training ratings
    output = dataclasses.replace(load_config().output, top_n=3, similar_items=2, cold_start_popular=popular)
    result = R.recommend(spark, model, train, user_index, item_index, output=output, k=5)
    recs = result.recommendations
    assert recs.columns == list(S.RECOMMENDATIONS_COLUMNS)
    assert recs.agg(F.max("rank")).first()[0] == 3
    cold = recs.where(F.col("user_id").isin("u11", "u12", "u13"))
    assert result.eligible_users == (14 if popular else 11)
    if not popular:
        assert cold.count() == 0 and result.listed_users == 11
        return
    counts = train.groupBy("item_idx").count().collect()
    ranked = sorted(((-r["count"], r.item_idx) for r in counts))[:3]
    want = [(f"u{u}", rank, f"i{i}", float(-n)) for u in (11, 12, 13) for rank, (n, i) in enumerate(ranked, 1)]
    assert sorted(tuple(r) for r in cold.collect()) == sorted(want)
    assert result.listed_users == 14


def test_recommend_tables_use_original_ids_and_zero_disables_a_table(spark, model_case):
    model, train, _, _ = model_case
    user_index, item_index = indexes(spark, 12, 9)
    output = dataclasses.replace(load_config().output, top_n=0, similar_items=2)
    result = R.recommend(spark, model, train, user_index, item_index, output=output, k=0)
    assert result.recommendations.count() == 0
    assert result.recommendations.columns == list(S.RECOMMENDATIONS_COLUMNS)
    similar = result.similar_items
    assert similar.columns == list(S.SIMILAR_ITEMS_COLUMNS)
    assert similar.count() == 18 and similar.where(F.col("item_id") == F.col("similar_item_id")).count() == 0
    assert dict(similar.dtypes) == {"item_id": "string", "rank": "int", "similar_item_id": "string", "similarity": "float"}


def test_nothing_to_list_runs_no_spark_job(spark, model_case):
    """top_n = 0, similar_items = 0 and no ranking metrics (k = 0): the stage costs only the writes of two empty tables."""
    model, train, _, _ = model_case
    user_index, item_index = indexes(spark, 12, 9)
    output = dataclasses.replace(load_config().output, top_n=0, similar_items=0, cold_start_popular=True)
    sc = spark.sparkContext
    sc.setJobGroup("nothing-to-list", "recommend with k = 0")
    try:
        result = R.recommend(spark, model, train, user_index, item_index, output=output, k=0)
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
    assert sc.statusTracker().getJobIdsForGroup("nothing-to-list") == []
    assert (result.listed_users, result.eligible_users) == (0, 0)
    # The optimizer knows both tables are empty, so writing them joins nothing onto the id indexes.
    for table in (result.recommendations, result.similar_items):
        assert "Join" not in table._jdf.queryExecution().optimizedPlan().toString()
    assert result.recommendations.count() == result.similar_items.count() == 0


# ---------------------------------------------------------------- in the job, and jobs/recommend.py

@pytest.fixture(scope="module")
def published(tiny_run):
    return tiny_run


def test_job_publishes_both_tables_for_every_trained_user_and_item(spark, published):
    cfg, result = published
    recs = lake.read_partition(spark, cfg.output.root, S.RECOMMENDATIONS, "r1")
    similar = lake.read_partition(spark, cfg.output.root, S.SIMILAR_ITEMS, "r1")
    users = lake.read_partition(spark, cfg.output.root, S.USER_FACTORS, "r1")
    items = lake.read_partition(spark, cfg.output.root, S.ITEM_FACTORS, "r1")
    assert recs.select("user_id").distinct().count() == users.count()
    assert recs.agg(F.max("rank")).first()[0] == 5
    assert similar.select("item_id").distinct().count() == items.count()
    assert similar.groupBy("item_id").count().where("count != 3").count() == 0
    metrics = result.metrics
    for name in ("precision@4", "recall@4", "ndcg@4", "map@4", "coverage@4", "full_lists@4"):
        assert 0.0 <= metrics[("evaluate", name)] <= 1.0, name
    assert metrics[("evaluate", "precision@4")] > 0.0
    assert ("recommend", "seconds") in metrics and ("train", "mu") in metrics


def test_rerun_replaces_the_two_tables_of_a_published_run(spark, published):
    cfg, _ = published
    before = lake.read_partition(spark, cfg.output.root, S.RECOMMENDATIONS, "r1")
    top3 = before.where("rank <= 3").cache()
    top3.count()
    # Only output.* comes from this config: the run's recorded input, split and seed give the seen items.
    again = dataclasses.replace(
        cfg, output=dataclasses.replace(cfg.output, top_n=3, similar_items=2),
        split=dataclasses.replace(cfg.split, test_fraction=0.5),
        input=dataclasses.replace(cfg.input, synthetic=dataclasses.replace(cfg.input.synthetic, ratings=999, seed=1)),
    )
    R.republish(spark, again)
    recs = lake.read_partition(spark, cfg.output.root, S.RECOMMENDATIONS, "r1")
    assert_df_equality(recs, top3, ignore_row_order=True, ignore_nullable=True, allow_nan_equality=True)
    similar = lake.read_partition(spark, cfg.output.root, S.SIMILAR_ITEMS, "r1")
    assert similar.agg(F.max("rank")).first()[0] == 2
    runs = lake.read_table(spark, cfg.output.root, S.RUNS).where("run_id = 'r1'").first()
    assert runs.status == "succeeded"


def test_rerun_refuses_an_unknown_run(spark, published):
    cfg, _ = published
    with pytest.raises(ConfigError, match="run.run_id"):
        R.republish(spark, dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, run_id="nope")))


def test_the_run_keeps_its_training_pairs_and_a_rerun_without_them_is_refused(spark, published, monkeypatch):
    cfg, result = published
    pairs = R.seen_pairs(spark, cfg.output.root, "r1")
    assert pairs.columns == [S.USER_IDX, S.ITEM_IDX]
    assert pairs.count() == result.metrics[("split", "train_rows")]
    monkeypatch.setattr(lake, "train_pairs_path", lambda root, run_id: f"{root}/_runs/{run_id}/gone")
    with pytest.raises(ConfigError, match="run.run_id: run r1 under .* kept no training pairs"):
        R.republish(spark, cfg)
