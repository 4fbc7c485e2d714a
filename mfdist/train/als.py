"""ALS trainer: Spark MLlib ALS on the residuals of a bias model (explicit), or plain implicit ALS.

MLlib's ALS has no bias terms, so for explicit feedback the global mean and
regularized user/item biases are fitted first and ALS factors the residuals
``r - mu - b_u - b_i``; the biases are published with the factors. For implicit
feedback (``input.implicit``) the ratings are confidences: ALS runs on them
directly with ``train.implicit_alpha`` and the model has mu = 0 and no biases.
"""

from __future__ import annotations

import logging
import time

from pyspark.ml.recommendation import ALS
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from mfdist import schema as S
from mfdist.evaluate import rating_metrics
from mfdist.train import EpochCallback, EpochRecord, Model, Trainer, TrainResult, check_finite
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

    def estimator(self) -> ALS:
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
        )

    def fit(self, train: DataFrame, *, test: DataFrame | None = None, callback: EpochCallback | None = None) -> TrainResult:
        t = self.cfg.train
        started = time.perf_counter()
        use_biases = t.biases and not self.cfg.input.implicit
        if use_biases:
            mu = global_mean(train)
            user_bias, item_bias = fit_biases(train, mu=mu, reg=t.bias_reg)
            target = residuals(train, mu=mu, user_bias=user_bias, item_bias=item_bias)
        else:
            mu, user_bias, item_bias, target = 0.0, None, None, train.select(S.USER_IDX, S.ITEM_IDX, S.RATING)
        log.info("als: rank=%d iterations=%d reg=%g biases=%s implicit=%s", t.rank, t.epochs, t.reg, use_biases, self.cfg.input.implicit)
        als_model = self.estimator().fit(target)
        model = Model(
            mu=mu,
            users=_model_frame(user_bias, als_model.userFactors, S.USER_IDX, t.rank).cache(),
            items=_model_frame(item_bias, als_model.itemFactors, S.ITEM_IDX, t.rank).cache(),
            rank=t.rank,
        )
        check_finite(model)
        lo_hi = self.cfg.input.rating_range
        train_rmse = rating_metrics(train, model, rating_range=lo_hi)["rmse"]
        test_rmse = rating_metrics(test, model, rating_range=lo_hi)["rmse"] if test is not None else None
        # MLlib runs all iterations inside one fit, so the final epoch is the one we can report.
        record = EpochRecord(t.epochs, None, train_rmse, test_rmse, None, time.perf_counter() - started)
        if callback:
            callback(record)
        return TrainResult(model, [record])
