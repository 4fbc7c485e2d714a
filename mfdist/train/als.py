"""ALS trainer: Spark MLlib ALS on the residuals of a bias model (explicit), or plain implicit ALS.

MLlib's ALS has no bias terms, so for explicit feedback the global mean and
regularized user/item biases are fitted first and ALS factors the residuals
``r - mu - b_u - b_i``; with ``train.bias_rounds`` > 1 the biases are refitted
on ``r - p_u . q_i`` and ALS run again (backfitting), which on ml-100k u1 took
test RMSE from 0.928 to 0.925. The biases are published with the factors. For implicit
feedback (``input.implicit``) the ratings are confidences: ALS runs on them
directly with ``train.implicit_alpha`` and the model has mu = 0 and no biases.
"""

from __future__ import annotations

import logging
import time

from pyspark.ml.recommendation import ALS, ALSModel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from mfdist import schema as S
from mfdist.evaluate import rating_metrics
from mfdist.model import Model, dot
from mfdist.train import EpochCallback, EpochRecord, Trainer, TrainResult, check_finite
from mfdist.train.biases import fit_biases, global_mean, residuals

log = logging.getLogger(__name__)


def _model_frame(bias: DataFrame | None, factors: DataFrame, idx_col: str, rank: int) -> DataFrame:
    """Join a bias frame and ALS factors (id, features) into idx, bias float, factors array<float>."""
    f = factors.select(F.col("id").alias(idx_col), F.col("features").alias(S.FACTORS))
    joined = f if bias is None else bias.join(f, idx_col, "full_outer")
    zeros = F.array_repeat(F.lit(0.0).cast(T.FloatType()), rank)
    bias_col = F.lit(0.0) if bias is None else F.coalesce(F.col(S.BIAS), F.lit(0.0))
    return joined.select(
        F.col(idx_col).cast(T.IntegerType()).alias(idx_col),
        bias_col.cast(T.FloatType()).alias(S.BIAS),
        F.coalesce(F.col(S.FACTORS), zeros).cast(S.FACTOR_TYPE).alias(S.FACTORS),
    )


class ALSTrainer(Trainer):
    """Spark MLlib ALS behind the Trainer interface."""

    def estimator(self, blocks: int) -> ALS:
        """MLlib's ALS with ``blocks`` user and item blocks (one per task slot unless ``train.blocks``)."""
        t, implicit = self.cfg.train, self.cfg.input.implicit
        return ALS(
            rank=t.rank,
            maxIter=t.epochs,
            regParam=t.reg,
            implicitPrefs=implicit,
            alpha=t.implicit_alpha,
            nonnegative=t.nonnegative,
            checkpointInterval=t.checkpoint_interval,
            seed=self.cfg.run.seed,
            userCol=S.USER_IDX,
            itemCol=S.ITEM_IDX,
            ratingCol=S.RATING,
            coldStartStrategy="drop",
            numUserBlocks=blocks,
            numItemBlocks=blocks,
        )

    def fit(self, train: DataFrame, *, test: DataFrame | None = None, callback: EpochCallback | None = None) -> TrainResult:
        t = self.cfg.train
        started = time.perf_counter()
        use_biases = t.biases and not self.cfg.input.implicit
        blocks = t.blocks or train.sparkSession.sparkContext.defaultParallelism
        log.info(
            "als: rank=%d iterations=%d reg=%g biases=%s implicit=%s blocks=%d",
            t.rank, t.epochs, t.reg, use_biases, self.cfg.input.implicit, blocks,
        )
        if use_biases:
            model = self._fit_with_biases(train, blocks)
        else:
            als_model = self.estimator(blocks).fit(train.select(S.USER_IDX, S.ITEM_IDX, S.RATING))
            model = self._model(0.0, None, None, als_model)
        check_finite(model)
        lo_hi = self.cfg.input.rating_range
        train_rmse = rating_metrics(train, model, rating_range=lo_hi)["rmse"]
        test_rmse = rating_metrics(test, model, rating_range=lo_hi)["rmse"] if test is not None else None
        # MLlib runs all iterations inside one fit, so the final epoch is the one we can report.
        record = EpochRecord(t.epochs, None, train_rmse, test_rmse, None, time.perf_counter() - started)
        if callback:
            callback(record)
        return TrainResult(model, [record])

    def _model(self, mu: float, user_bias: DataFrame | None, item_bias: DataFrame | None, als_model: ALSModel) -> Model:
        rank = self.cfg.train.rank
        return Model(
            mu=mu,
            users=_model_frame(user_bias, als_model.userFactors, S.USER_IDX, rank).cache(),
            items=_model_frame(item_bias, als_model.itemFactors, S.ITEM_IDX, rank).cache(),
            rank=rank,
        )

    def _fit_with_biases(self, train: DataFrame, blocks: int) -> Model:
        """Backfitting: biases on ``r - p.q`` of the previous round, then ALS on ``r - mu - b_u - b_i``."""
        t = self.cfg.train
        mu = global_mean(train)
        base = train
        for round_no in range(1, t.bias_rounds + 1):
            user_bias, item_bias = fit_biases(base, mu=mu, reg=t.bias_reg)
            als_model = self.estimator(blocks).fit(residuals(train, mu=mu, user_bias=user_bias, item_bias=item_bias))
            log.info("als: bias round %d/%d done", round_no, t.bias_rounds)
            if round_no < t.bias_rounds:
                base = _minus_dot(train, als_model).cache()
        return self._model(mu, user_bias, item_bias, als_model)


def _minus_dot(ratings: DataFrame, als_model: ALSModel) -> DataFrame:
    """``ratings`` with ``p_u . q_i`` subtracted, for refitting the biases."""
    users = als_model.userFactors.select(F.col("id").alias(S.USER_IDX), F.col("features").alias("_p"))
    items = als_model.itemFactors.select(F.col("id").alias(S.ITEM_IDX), F.col("features").alias("_q"))
    joined = ratings.join(users, S.USER_IDX).join(items, S.ITEM_IDX)
    return joined.select(S.USER_IDX, S.ITEM_IDX, (F.col(S.RATING) - dot("_p", "_q")).alias(S.RATING))
