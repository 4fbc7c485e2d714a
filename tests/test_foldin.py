"""Fold-in: one ridge solve per user against a published run's items, published as a run of its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import functions as F

from mfdist import lake
from mfdist import schema as S
from mfdist.config import SyntheticConfig, load_config
from mfdist.errors import ConfigError
from mfdist.foldin.job import fold_in, ridge_for, run_foldin
from mfdist.foldin.solve import Ridge, solve_row
from mfdist.pipeline import run
from mfdist.published import run_metric
from mfdist.recommend import republish
from mfdist.synth import generate_ratings

RANK = 4


def _lstsq(fixed: np.ndarray, target: np.ndarray, *, factor_penalty: float, bias_penalty: float) -> np.ndarray:
    """[bias, factors] by numpy's least squares on the ridge problem written as rows: sqrt(penalty) * I under the design."""
    design = np.column_stack([np.ones(len(target)), fixed])
    penalty = np.sqrt(np.diag([bias_penalty] + [factor_penalty] * fixed.shape[1]))
    stacked = np.vstack([design, penalty])
    return np.linalg.lstsq(stacked, np.concatenate([target, np.zeros(len(penalty))]), rcond=None)[0]


def test_a_row_solve_is_the_least_squares_solution_of_the_trainers_objective():
    rng = np.random.default_rng(0)
    fixed, target = rng.standard_normal((12, RANK)), rng.standard_normal(12)
    dsgd = Ridge(reg=0.12, bias_reg=1.0, biases=True, exponent=0.6, mean_count=30.0)
    bias, factors = solve_row(fixed, target, dsgd)
    expected = _lstsq(fixed, target, factor_penalty=0.12 * 30.0**0.4 * 12**0.6, bias_penalty=1.0)
    np.testing.assert_allclose([bias, *factors], expected, atol=1e-10)
    bias, factors = solve_row(fixed, target, Ridge(reg=0.1, bias_reg=1.0, biases=False))
    assert bias == 0.0
    np.testing.assert_allclose(factors, np.linalg.solve(fixed.T @ fixed + 0.1 * 12 * np.eye(RANK), fixed.T @ target))


@pytest.mark.parametrize("broadcast_max_mb", [0, 64], ids=["shuffle-join", "broadcast"])
def test_fold_in_solves_each_key_once_on_all_its_ratings_whichever_join(spark, broadcast_max_mb):
    rng = np.random.default_rng(3)
    items = rng.standard_normal((30, RANK)).astype(np.float32)
    item_bias = rng.standard_normal(30).astype(np.float32)
    fixed = spark.createDataFrame([(i, float(item_bias[i]), items[i].tolist()) for i in range(30)],
                                  f"{S.ITEM_IDX} int, {S.BIAS} float, {S.FACTORS} array<float>")
    pairs = [(u, int(i), float(rng.integers(1, 6))) for u in range(9) for i in rng.choice(30, 6 + u, replace=False)]
    ratings = spark.createDataFrame(pairs, f"{S.USER_IDX} int, {S.ITEM_IDX} int, {S.RATING} double").repartition(3)
    ridge = Ridge(reg=0.1, bias_reg=0.5, biases=True)
    solved = fold_in(ratings, fixed, key=S.USER_IDX, other=S.ITEM_IDX, mu=3.0, rank=RANK, ridge=ridge,
                     broadcast_max_mb=broadcast_max_mb)
    got = _by_idx(solved, S.USER_IDX)
    assert solved.count() == len(got) == 9
    for u in range(9):
        rows = [(i, r) for v, i, r in pairs if v == u]
        idx = np.array([i for i, _ in rows])
        target = np.array([r for _, r in rows]) - 3.0 - item_bias[idx]
        expected = _lstsq(items[idx].astype(np.float64), target, factor_penalty=0.1 * len(rows), bias_penalty=0.5)
        np.testing.assert_allclose(got[u], expected, atol=1e-4)


@pytest.fixture(scope="module")
def lake_with_base(spark, tmp_path_factory):
    """An ALS run on 90% of the users; the other 10% and user 1 (whole history) as the ratings to fold in."""
    folder = tmp_path_factory.mktemp("foldin")
    ratings = generate_ratings(spark, cfg=SyntheticConfig(users=400, items=100, ratings=12_000, rank=3, seed=5),
                               rating_range=[1.0, 5.0], partitions=2).drop(S.TS)
    held_out = F.col(S.USER_ID) % 10 == 0
    ratings.where(~held_out).coalesce(1).write.parquet(str(folder / "base"))
    unknown_item = spark.createDataFrame([(10, 9999, 4.0)], f"{S.USER_ID} long, {S.ITEM_ID} long, {S.RATING} double")
    ratings.where(held_out | (F.col(S.USER_ID) == 1)).unionByName(unknown_item).coalesce(1).write.parquet(str(folder / "new"))
    cfg = _config(folder, "base", "base", "train.algorithm=als", f"train.rank={RANK}", "train.epochs=5", "train.bias_rounds=1")
    run(spark, cfg)
    return folder


def _config(folder, run_id: str, ratings: str, *extra: str):
    return load_config(None, [
        f"output.root={folder}/lake", f"run.checkpoint_dir={folder}/ck", f"run.run_id={run_id}",
        "input.format=parquet", f"input.path={folder / ratings}", "output.top_n=5", "output.similar_items=3", "evaluate.k=5",
        *extra,
    ])


def _by_idx(frame, idx_col: str) -> dict[int, np.ndarray]:
    return {r[0]: np.array([r[1], *r[2]]) for r in frame.select(idx_col, S.BIAS, S.FACTORS).collect()}


def test_foldin_publishes_a_run_with_the_folded_users_solved_against_the_base_items(spark, lake_with_base):
    folder = lake_with_base
    cfg = _config(folder, "fold", "new", "foldin.base_run=base")
    result = run_foldin(spark, cfg)
    root = cfg.output.root
    assert result.record.status == "succeeded" and result.record.algorithm == "foldin"
    table = {t: lake.read_partition(spark, root, t, "fold") for t in S.RUN_TABLES}
    base = {t: lake.read_partition(spark, root, t, "base") for t in (S.USER_INDEX, S.USER_FACTORS, S.ITEM_FACTORS, S.RECOMMENDATIONS)}
    given = spark.read.parquet(str(folder / "new")).where(F.col(S.ITEM_ID) != 9999)
    folded_ids = {r[0] for r in given.select(S.USER_ID).distinct().collect()}
    assert result.folded == len(folded_ids) and result.new_ids == len(folded_ids) - 1  # all but user 1 are new

    # New ids are appended to the base index; known ids keep theirs.
    base_index = {r.user_id: r.user_idx for r in base[S.USER_INDEX].collect()}
    index = {r.user_id: r.user_idx for r in table[S.USER_INDEX].collect()}
    assert {u: index[u] for u in base_index} == base_index
    assert sorted(index[u] for u in folded_ids - {1}) == list(range(len(base_index), len(index)))

    # Folded users: one ridge solve each with the base run's items fixed (ALS: reg * n); the others carried over.
    mu = lake.read_partition(spark, root, S.METRICS, "base").where("stage = 'train' AND metric = 'mu'").first().value
    items = {r.item_id: (r.bias, np.array(r.factors)) for r in base[S.ITEM_FACTORS].collect()}
    users = _by_idx(table[S.USER_FACTORS], S.USER_IDX)
    base_users = _by_idx(base[S.USER_FACTORS], S.USER_IDX)
    for user in (1, 10, 20):
        rows = [(r.item_id, r.rating) for r in given.where(F.col(S.USER_ID) == user).collect()]
        fixed = np.stack([items[i][1] for i, _ in rows]).astype(np.float64)
        target = np.array([r - mu - items[i][0] for i, r in rows])
        expected = _lstsq(fixed, target, factor_penalty=cfg.train.reg * len(rows), bias_penalty=cfg.train.bias_reg)
        np.testing.assert_allclose(users[index[user]], expected, atol=1e-4)
    carried = [idx for u, idx in base_index.items() if u not in folded_ids]
    assert all(np.array_equal(users[i], base_users[i]) for i in carried)
    assert table[S.USER_FACTORS].count() == len(base_users) + result.new_ids
    assert table[S.ITEM_FACTORS].count() == base[S.ITEM_FACTORS].count()

    # Lists: recomputed for the folded users without their given items, the base run's for everyone else.
    recs = table[S.RECOMMENDATIONS]
    seen = given.select(S.USER_ID, S.ITEM_ID)
    assert recs.join(seen, [S.USER_ID, S.ITEM_ID]).count() == 0
    assert {r[0] for r in recs.where(F.col(S.USER_ID).isin(list(folded_ids))).select(S.USER_ID).distinct().collect()} == folded_ids
    others = base[S.RECOMMENDATIONS].where(~F.col(S.USER_ID).isin(list(folded_ids)))
    assert others.exceptAll(recs).count() == 0
    assert table[S.SIMILAR_ITEMS].count() > 0
    rejected = table[S.REJECTED_RATINGS].collect()
    assert [(r.item_id, r.reason) for r in rejected] == [("9999", "item_id has no factors in run base")]
    assert result.record.rejected_rows == 1 and result.record.accepted_rows == given.count()
    assert lake.latest_succeeded_run(spark, root) == "fold"
    # The reg it solved with is recorded, so a later fold-in on this run solves with it too.
    assert run_metric(spark, root, "fold", "train", "reg") == pytest.approx(cfg.train.reg)


def test_foldin_solves_with_the_reg_the_base_run_recorded_over_its_config():
    cfg = _config(Path("/tmp"), "unit", "new", "train.algorithm=dsgd", "train.reg=0.12")
    assert ridge_for(cfg, mean_count=2.0).reg == 0.12
    chosen = ridge_for(cfg, mean_count=2.0, reg=0.03)  # train.tune_reg's choice, metric train/reg
    assert chosen.reg == 0.03 and chosen.factor(2) == pytest.approx(0.03 * 2.0)


def test_foldin_of_items_replaces_their_factors_and_similar_items(spark, lake_with_base):
    folder = lake_with_base
    cfg = _config(folder, "fold-items", "new", "foldin.base_run=base", "foldin.side=items")
    result = run_foldin(spark, cfg)
    assert result.record.status == "succeeded" and result.new_ids == 0  # every item of the file is known to the base
    root = cfg.output.root
    items = _by_idx(lake.read_partition(spark, root, S.ITEM_FACTORS, "fold-items"), S.ITEM_IDX)
    base_items = _by_idx(lake.read_partition(spark, root, S.ITEM_FACTORS, "base"), S.ITEM_IDX)
    assert items.keys() == base_items.keys()
    changed = sum(not np.allclose(items[i], base_items[i]) for i in items)
    assert changed == result.folded > 0
    similar = lake.read_partition(spark, root, S.SIMILAR_ITEMS, "fold-items")
    assert similar.where(F.col(S.ITEM_ID) == F.col("similar_item_id")).count() == 0
    assert similar.select(S.ITEM_ID).distinct().count() == len(items)


def test_a_missing_base_run_is_an_error_naming_the_key(spark, lake_with_base):
    with pytest.raises(ConfigError, match="foldin.base_run: no succeeded run nope"):
        run_foldin(spark, _config(lake_with_base, "f-missing", "new", "foldin.base_run=nope"))
    with pytest.raises(ConfigError, match="foldin.base_run: required"):
        run_foldin(spark, _config(lake_with_base, "f-none", "new"))


def test_rescoring_a_foldin_run_is_refused_since_its_input_is_only_the_folded_users(spark, lake_with_base):
    cfg = _config(lake_with_base, "fold-again", "new", "foldin.base_run=base")
    run_foldin(spark, cfg)
    with pytest.raises(ConfigError, match="run.run_id: run fold-again is a fold-in of run base"):
        republish(spark, cfg)
