"""Behaviour every trainer shares (ALS and DSGD), on planted low-rank synthetic ratings."""

from __future__ import annotations

import math

import pytest
from pyspark.sql import functions as F

from mfdist import schema as S
from mfdist.config import load_config
from mfdist.evaluate import rating_metrics
from mfdist.split import random_split
from mfdist.synth import generate_ratings
from mfdist.train import make_trainer

NOISE = 0.3
PLANTED = [
    "input.synthetic.users=300", "input.synthetic.items=100", "input.synthetic.ratings=30000",
    "input.synthetic.rank=3", f"input.synthetic.noise={NOISE}",
]
SETTINGS = {
    "als": ["train.rank=6", "train.epochs=10", "train.reg=0.05", "train.bias_rounds=1"],
    "dsgd": ["train.rank=6", "train.epochs=10", "train.reg=0.05", "train.step_size=0.04", "train.tol=0"],
}


@pytest.fixture(scope="module")
def planted(spark):
    cfg = load_config(None, PLANTED)
    ratings = generate_ratings(spark, cfg=cfg.input.synthetic, rating_range=cfg.input.rating_range, partitions=2)
    indexed = ratings.select(F.col(S.USER_ID).cast("int").alias(S.USER_IDX), F.col(S.ITEM_ID).cast("int").alias(S.ITEM_IDX), S.RATING)
    train, test = random_split(indexed, test_fraction=0.2, seed=3)
    return train.cache(), test.cache()


@pytest.fixture(scope="module", params=sorted(SETTINGS))
def fitted(request, planted, tmp_path_factory):
    algorithm = request.param
    ck = tmp_path_factory.mktemp(f"ck-{algorithm}")
    cfg = load_config(None, [*PLANTED, f"train.algorithm={algorithm}", f"run.checkpoint_dir={ck}", "run.run_id=t", *SETTINGS[algorithm]])
    train, test = planted
    seen = []
    result = make_trainer(cfg).fit(train, test=test, callback=seen.append)
    return cfg, result, seen


def test_test_rmse_approaches_the_noise_level(planted, fitted):
    cfg, result, _ = fitted
    _, test = planted
    rmse = rating_metrics(test, result.model, rating_range=cfg.input.rating_range)["rmse"]
    assert rmse < 1.3 * NOISE, f"{cfg.train.algorithm}: test RMSE {rmse:.3f} vs noise {NOISE}"


def test_model_frames_have_the_contract_schema_and_only_trained_rows(planted, fitted):
    cfg, result, _ = fitted
    train, _ = planted
    model = result.model
    for frame, idx in ((model.users, S.USER_IDX), (model.items, S.ITEM_IDX)):
        assert [(f.name, f.dataType) for f in frame.schema] == [
            (f.name, f.dataType) for f in (S.MODEL_SCHEMA_USERS if idx == S.USER_IDX else S.MODEL_SCHEMA_ITEMS)
        ]
        assert frame.where(F.size(S.FACTORS) != cfg.train.rank).count() == 0
        assert frame.select(idx).distinct().count() == frame.count() == train.select(idx).distinct().count()
    assert model.rank == cfg.train.rank and 1.0 < model.mu < 5.0


def _kept(records):
    """The epochs a trainer kept: those without a loss (ALS) or whose loss improved (a bold driver)."""
    best, kept = math.inf, []
    for r in records:
        if r.loss is None or r.loss < best:
            best = best if r.loss is None else r.loss
            kept.append(r)
    return kept


def test_the_callback_sees_each_epoch_and_the_last_kept_one_matches_evaluate(planted, fitted):
    cfg, result, seen = fitted
    _, test = planted
    assert seen == result.epochs and seen
    assert seen[-1].epoch == cfg.train.epochs
    rmse = rating_metrics(test, result.model, rating_range=cfg.input.rating_range)["rmse"]
    assert _kept(seen)[-1].test_rmse == pytest.approx(rmse, abs=1e-4)
