"""Stage 4, train: the trainer interface and the factory that picks ALS or DSGD.

Every trainer returns a :class:`~mfdist.model.Model` (the published model
``r ~ mu + b_u + b_i + p_u . q_i``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from mfdist import schema as S
from mfdist.config import Config
from mfdist.errors import ModelFitError
from mfdist.model import Model

if TYPE_CHECKING:
    from mfdist.train.warm import WarmStart


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    loss: Optional[float]
    train_rmse: Optional[float]
    test_rmse: Optional[float]
    step_size: Optional[float]
    seconds: float
    validation_rmse: Optional[float] = None  # DSGD with train.early_stopping: the held-out slice's RMSE


@dataclass
class TrainResult:
    model: Model
    epochs: list[EpochRecord] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # the trainer's own (stage train), e.g. best_epoch


# Called after each epoch with the record, so the job can log and tests can observe.
EpochCallback = Callable[[EpochRecord], None]


class Trainer(ABC):
    """Fits a Model on indexed training ratings (user_idx, item_idx, rating)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    @abstractmethod
    def fit(self, train: DataFrame, *, test: DataFrame | None = None, callback: EpochCallback | None = None) -> TrainResult:
        """Train on ``train``; ``test`` (indexed, may hold unseen ids) is for per-epoch RMSE."""


def make_trainer(cfg: Config, *, warm: WarmStart | None = None) -> Trainer:
    """The trainer for ``train.algorithm``; ``warm`` (DSGD only, see config validation): the factors to start from."""
    if cfg.train.algorithm == "als":
        from mfdist.train.als import ALSTrainer

        return ALSTrainer(cfg)
    from mfdist.train.dsgd.trainer import DSGDTrainer

    return DSGDTrainer(cfg, warm=warm)


def check_finite(model: Model) -> None:
    """Raise ModelFitError when any bias or factor is NaN or infinite (a bounded action)."""
    def bad(frame: DataFrame) -> bool:
        not_finite = F.exists(S.FACTORS, lambda x: F.isnan(x) | (F.abs(x) == float("inf")))
        return frame.where(not_finite | F.isnan(S.BIAS) | (F.abs(S.BIAS) == float("inf"))).limit(1).count() > 0

    if bad(model.users) or bad(model.items):
        raise ModelFitError(
            "NaN or infinite values in the trained factors: the model diverged; "
            "try a smaller train.step_size or a larger train.reg"
        )
