"""The refine stage on planted data: it improves under-trained factors, merges exactly the block, refuses bad blocks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from chispa import assert_df_equality
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from mfdist import lake
from mfdist import schema as S
from mfdist.config import Config, load_config
from mfdist.errors import ConfigError
from mfdist.evaluate import rating_metrics
from mfdist.foldin.job import ridge_for
from mfdist.foldin.solve import solve_row
from mfdist.pipeline import run
from mfdist.publish import factor_table
from mfdist.refine import HELD_OUT, MLP_CONFIG, MLP_WEIGHTS, RefineError, ResidualMLP, plan_block, refine, resolve, sample_ids
from mfdist.model import Model

USERS, ITEMS, RANK, MU = 60, 40, 4, 3.0
RATINGS_SCHEMA = T.StructType(
    [
        T.StructField(S.USER_IDX, T.IntegerType(), False),
        T.StructField(S.ITEM_IDX, T.IntegerType(), False),
        T.StructField(S.RATING, T.DoubleType(), False),
    ]
)


def planted(spark: SparkSession, *, factor_noise: float, rating_noise: float, square: float = 0.0,
            users: int = USERS, items: int = ITEMS) -> tuple[DataFrame, Model]:
    """Ratings from a planted rank-4 model (80% dense, user activity varying) and a model perturbed by ``factor_noise``.

    ``square`` adds ``square * (p_u . q_i)^2`` to every rating: a residual no dot product of the factors can fit.
    """
    rng = np.random.default_rng(0)
    p, q = rng.normal(0, 0.5, (users, RANK)), rng.normal(0, 0.5, (items, RANK))
    bu, bi = rng.normal(0, 0.2, users), rng.normal(0, 0.2, items)
    # Users rate a share of items falling from 95% to 50%, so top_active has a clear order.
    seen = rng.random((users, items)) < np.linspace(0.95, 0.5, users)[:, None]
    users, items = np.nonzero(seen)
    dot = (p[users] * q[items]).sum(1)
    r = MU + bu[users] + bi[items] + dot + square * dot**2 + rng.normal(0, rating_noise, len(users))
    ratings = spark.createDataFrame(
        [(int(u), int(i), float(x)) for u, i, x in zip(users, items, np.clip(r, 1.0, 5.0))], RATINGS_SCHEMA
    ).cache()

    def side(bias: np.ndarray, factors: np.ndarray, schema: T.StructType) -> DataFrame:
        b = bias + rng.normal(0, factor_noise, bias.shape)
        f = factors + rng.normal(0, factor_noise, factors.shape)
        rows = [(k, float(b[k]), [float(x) for x in f[k]]) for k in range(len(b))]
        return spark.createDataFrame(rows, schema).cache()

    model = Model(MU, side(bu, p, S.MODEL_SCHEMA_USERS), side(bi, q, S.MODEL_SCHEMA_ITEMS), RANK)
    return ratings, model


def config(tmp_path, *overrides: str) -> Config:
    base = [
        f"output.root={tmp_path}/lake", "refine.enabled=true", "refine.device=cpu",
        "refine.sample.users=20", "refine.sample.items=20", "refine.epochs=150", "refine.lr=0.02",
        "refine.patience=10", "train.reg=0.01", "train.bias_reg=1.0",
    ]
    return load_config(None, base + list(overrides))


def ids(frame: DataFrame, col: str) -> set[int]:
    return {row[0] for row in frame.select(col).collect()}


def test_refinement_of_undertrained_factors_improves_and_replaces_exactly_the_block(spark, tmp_path):
    ratings, model = planted(spark, factor_noise=0.3, rating_noise=0.05)
    cfg = config(tmp_path)
    result = refine(plan_block(ratings, cfg), model, cfg)

    m = result.metrics
    assert m["accepted"] == 1.0
    assert m["rmse_after"] < 0.7 * m["rmse_before"]
    assert (m["users"], m["items"], m["device_cuda"]) == (20, 20, 0.0)
    assert m["ratings"] == ratings.where(F.col(S.USER_IDX).isin(list(ids(result.users, S.USER_IDX)))
                                         & F.col(S.ITEM_IDX).isin(list(ids(result.items, S.ITEM_IDX)))).count()
    assert [e.epoch for e in result.epochs] == list(range(1, len(result.epochs) + 1))
    assert all(e.step_size == 0.02 and e.test_rmse is not None for e in result.epochs)

    for before, after, idx in ((model.users, result.model.users, S.USER_IDX), (model.items, result.model.items, S.ITEM_IDX)):
        block = list(ids(result.users if idx == S.USER_IDX else result.items, idx))
        outside = ~F.col(idx).isin(block)
        assert_df_equality(before.where(outside), after.where(outside), ignore_row_order=True, ignore_nullable=True)
        changed = before.alias("b").join(after.alias("a"), idx).where(
            (F.col("b.bias") != F.col("a.bias")) | (F.col("b.factors") != F.col("a.factors"))
        )
        assert ids(changed, idx) == set(block)
        assert after.count() == before.count()

    index = spark.range(USERS).select((F.col("id") + 1000).alias(S.USER_ID), F.col("id").cast("int").alias(S.USER_IDX))
    published = factor_table(result.model.users, index, idx_col=S.USER_IDX, refined=result.users)
    assert ids(published.where(S.REFINED), S.USER_IDX) == ids(result.users, S.USER_IDX)
    assert published.where(~F.col(S.REFINED)).count() == USERS - 20


def test_refinement_that_does_not_improve_is_not_merged(spark, tmp_path):
    # Exact factors on noiseless ratings: the start fits the validation ratings and steps away from it do not.
    ratings, model = planted(spark, factor_noise=0.0, rating_noise=0.0)
    cfg = config(tmp_path, "refine.epochs=5", "refine.patience=2", "train.reg=0.0001", "train.bias_reg=0.0001")
    result = refine(plan_block(ratings, cfg), model, cfg)

    assert result.metrics["accepted"] == 0.0
    assert result.metrics["rmse_after"] == result.metrics["rmse_before"] < 0.02  # the 1-5 clip is not low-rank
    assert all(e.test_rmse > result.metrics["rmse_before"] for e in result.epochs)
    assert result.model is model and result.users is None and result.items is None
    index = spark.range(ITEMS).select(F.col("id").alias(S.ITEM_ID), F.col("id").cast("int").alias(S.ITEM_IDX))
    assert factor_table(result.model.items, index, idx_col=S.ITEM_IDX, refined=result.items).where(S.REFINED).count() == 0


def test_the_start_is_the_trainers_solve_of_the_block_without_its_validation_ratings(spark, tmp_path):
    ratings, model = planted(spark, factor_noise=0.3, rating_noise=0.05)
    cfg = config(tmp_path, "train.algorithm=als")
    plan = plan_block(ratings, cfg)
    fit = plan.fit_ratings(with_validation=False)
    start = resolve(fit, plan, model, cfg)

    # Users: the ALS ridge solve on all their ratings but the validation ones against the item factors;
    # then items against those users. Rows outside the block are untouched.
    block_users, block_items = sorted(ids(plan.users, S.USER_IDX)), sorted(ids(plan.items, S.ITEM_IDX))
    ridge = ridge_for(cfg, mean_count=1.0)
    for side, other, key, other_key, block in (
        (start.users, model.items, S.USER_IDX, S.ITEM_IDX, block_users),
        (start.items, start.users, S.ITEM_IDX, S.USER_IDX, block_items),
    ):
        row = side.where(F.col(key) == block[0]).first()
        rated = fit.where(F.col(key) == block[0]).join(other, other_key).orderBy(other_key).toPandas()
        bias, factors = solve_row(np.stack(rated[S.FACTORS].to_numpy()).astype(np.float64),
                                  (rated[S.RATING] - MU - rated[S.BIAS]).to_numpy(), ridge)
        np.testing.assert_allclose([row[S.BIAS], *row[S.FACTORS]], [bias, *factors], atol=1e-4)
    for before, after, key, block in ((model.users, start.users, S.USER_IDX, block_users),
                                      (model.items, start.items, S.ITEM_IDX, block_items)):
        outside = ~F.col(key).isin(block)
        assert_df_equality(before.where(outside), after.where(outside), ignore_row_order=True, ignore_nullable=True)

    # The gate starts from that solve, scored on the validation ratings it never saw.
    validation = plan.ratings.where(HELD_OUT).drop(HELD_OUT)
    expected = rating_metrics(validation, start, rating_range=cfg.input.rating_range)["rmse"]
    assert refine(plan, model, cfg).metrics["rmse_before"] == pytest.approx(expected, abs=1e-4)


def test_oversized_block_is_refused_with_a_message_naming_the_key(spark, tmp_path):
    ratings, model = planted(spark, factor_noise=0.3, rating_noise=0.05)
    with pytest.raises(RefineError, match=r"holds [\d,]+ training ratings, more than refine\.sample\.max_ratings=100") as err:
        cfg = config(tmp_path, "refine.sample.max_ratings=100")
        refine(plan_block(ratings, cfg), model, cfg)
    assert isinstance(err.value, ConfigError)  # so the job exits 2


def test_mlp_head_fits_a_residual_the_dot_product_cannot_and_saves_weights_and_config(spark, tmp_path):
    # What no dot product of the factors fits is the planted (p.q)^2 term: without it the head gains 7% here.
    ratings, model = planted(spark, factor_noise=0.0, rating_noise=0.05, square=1.0, users=120, items=80)
    cfg = config(tmp_path, "refine.head=mlp", "refine.sample.users=120", "refine.sample.items=80",
                 "refine.epochs=400", "refine.patience=30", "run.run_id=r1")
    result = refine(plan_block(ratings, cfg), model, cfg)

    # On held-out ratings (0.69x measured).
    assert result.metrics["mlp_rmse"] < 0.8 * result.metrics["rmse_after"]
    where = lake.artifacts_path(cfg.output.root, "r1")
    meta = json.loads(open(f"{where}/{MLP_CONFIG}").read())
    assert meta["rank"] == RANK and meta["validation_rmse"] == result.metrics["mlp_rmse"]
    ResidualMLP(RANK).load_state_dict(torch.load(f"{where}/{MLP_WEIGHTS}"))  # strict: same layers and shapes


def test_sample_ids_takes_the_most_active_or_a_seeded_uniform_draw(spark):
    ratings, _ = planted(spark, factor_noise=0.0, rating_noise=0.0)
    counts = {r[0]: r[1] for r in ratings.groupBy(S.USER_IDX).count().collect()}
    top = sample_ids(ratings, idx_col=S.USER_IDX, n=10, strategy="top_active", seed=1)
    assert top == sorted(counts, key=lambda u: (-counts[u], u))[:10]

    some = ratings.where(F.col(S.USER_IDX) < 50)
    draw = sample_ids(some, idx_col=S.USER_IDX, n=10, strategy="random", seed=1)
    assert draw == sample_ids(some.repartition(3), idx_col=S.USER_IDX, n=10, strategy="random", seed=1)
    assert len(set(draw)) == 10 and max(draw) < 50 and draw != top
    assert draw != sample_ids(some, idx_col=S.USER_IDX, n=10, strategy="random", seed=2)


def test_validation_ratings_are_a_seeded_share_of_the_block(spark, tmp_path):
    ratings, _ = planted(spark, factor_noise=0.0, rating_noise=0.0)
    cfg = config(tmp_path, "refine.validation_fraction=0.25")
    plan = plan_block(ratings, cfg)
    key = [S.USER_IDX, S.ITEM_IDX]
    held = plan.ratings.where(HELD_OUT).select(*key).cache()
    in_block = ratings.join(F.broadcast(plan.users), S.USER_IDX).join(F.broadcast(plan.items), S.ITEM_IDX)

    # A seeded quarter of the block's ratings, and nothing outside the block.
    assert held.join(in_block, key, "left_anti").count() == 0
    assert 0.15 < held.count() / in_block.count() < 0.35
    # The start is solved on every other rating, each once; the refit on all of them.
    fit = plan.fit_ratings(with_validation=False)
    assert fit.columns == ratings.columns
    assert fit.join(held, key).count() == 0 and fit.count() + held.count() == ratings.count()
    assert_df_equality(plan.fit_ratings(with_validation=True), ratings, ignore_row_order=True, ignore_nullable=True)
    # The flags depend on the seed and the pair, not on the partitioning.
    again = plan_block(ratings.repartition(3), cfg).ratings.where(HELD_OUT).select(*key)
    assert_df_equality(held, again, ignore_row_order=True)
    other = plan_block(ratings, config(tmp_path, "refine.validation_fraction=0.25", "run.seed=9"))
    assert other.ratings.where(HELD_OUT).select(*key).exceptAll(held).count() > 0


def test_a_merged_block_is_refit_with_its_validation_ratings(spark, tmp_path):
    ratings, model = planted(spark, factor_noise=0.3, rating_noise=0.05)
    cfg = config(tmp_path)
    plan = plan_block(ratings, cfg)
    result = refine(plan, model, cfg)
    assert result.metrics["accepted"] == 1.0

    # The validation-chosen state never saw these ratings; the published (refit) block did, so it fits them closer.
    validation = plan.ratings.where(HELD_OUT).drop(HELD_OUT)
    published = rating_metrics(validation, result.model, rating_range=cfg.input.rating_range)["rmse"]
    assert published < 0.9 * result.metrics["rmse_after"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_config_error(spark, tmp_path):
    ratings, model = planted(spark, factor_noise=0.3, rating_noise=0.05)
    with pytest.raises(RefineError, match="refine.device: cuda"):
        cfg = config(tmp_path, "refine.device=cuda")
        refine(plan_block(ratings, cfg), model, cfg)


def test_refine_is_refused_for_implicit_feedback():
    with pytest.raises(ConfigError, match="refine.enabled"):
        load_config(None, ["refine.enabled=true", "input.implicit=true"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_refinement_on_cuda_improves_and_says_so(spark, tmp_path):
    ratings, model = planted(spark, factor_noise=0.3, rating_noise=0.05)
    cfg = config(tmp_path, "refine.device=auto", "refine.head=mlp")
    result = refine(plan_block(ratings, cfg), model, cfg)
    assert result.device.startswith("cuda") and result.metrics["device_cuda"] == 1.0
    assert result.metrics["accepted"] == 1.0 and result.metrics["rmse_after"] < 0.7 * result.metrics["rmse_before"]
    assert result.metrics["mlp_rmse"] <= result.metrics["rmse_after"]


def test_pipeline_records_refine_metrics_and_epochs_and_publishes_the_refined_flag(spark, tmp_path):
    cfg = load_config(None, [
        "input.synthetic.users=300", "input.synthetic.items=80", "input.synthetic.ratings=8000",
        "train.rank=4", "train.epochs=1", "train.bias_rounds=1", "refine.enabled=true", "refine.sample.users=60", "refine.sample.items=40",
        "refine.epochs=40", "refine.lr=0.01", f"output.root={tmp_path}/lake", f"run.checkpoint_dir={tmp_path}/ck",
        "run.run_id=e2e", "output.top_n=0", "output.similar_items=0",
    ])
    result = run(spark, cfg)

    refine_metrics = {m: v for (stage, m), v in result.metrics.items() if stage == "refine"}
    assert {"rmse_before", "rmse_after", "users", "items", "ratings", "seconds", "device_cuda", "accepted"} <= set(refine_metrics)
    assert any(row[0] == "refine" for row in result.epochs)
    users = lake.read_partition(spark, cfg.output.root, S.USER_FACTORS, "e2e")
    assert users.where(S.REFINED).count() == (refine_metrics["users"] if refine_metrics["accepted"] else 0)
    stored = lake.read_partition(spark, cfg.output.root, S.METRICS, "e2e").where(F.col("stage") == "refine")
    assert stored.count() == len(refine_metrics)
