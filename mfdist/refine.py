"""Stage 5, refine: fine-tune a sampled block of the trained model with torch; merge it where it generalizes.

After training (on every training rating: the stage takes none from the trainer):

1. :func:`plan_block` samples ``refine.sample.users`` users and ``refine.sample.items``
   items of the training ratings: ``top_active`` takes those with the most ratings
   (where most traffic is), ``random`` a uniform draw seeded by ``run.seed``; and
   flags a seeded share (``refine.validation_fraction``, by a hash of the pair) of
   the block's ratings as validation.
2. The start: the block's users, then its items, re-solved on all their training
   ratings but the validation ones, with the trainer's own penalties and the other
   side fixed (:func:`resolve`, the fold-in solve of :mod:`mfdist.foldin`): the
   trainer's answer for those rows without the validation ratings, so the gate
   below compares held-out errors.
3. :func:`refine` counts the block's ratings in Spark and refuses a block over
   ``refine.sample.max_ratings`` before anything is collected; then brings only
   the block to the driver: its ratings and its users' and items' biases and
   factors (all bounded by config).
4. Fit ``mu + b_u + b_i + p_u . q_i`` from the start with full-batch (or
   65,536-rating mini-batch) Adam on ``mean((r - r_hat)^2) + train.reg *
   mean(|p_u|^2 + |q_i|^2) + train.bias_reg / n_fit * (sum b_u^2 + sum b_i^2)``:
   per rating, the sum objective of Spark's ALS-WR (whose L2 on a factor grows
   with its rating count) and of the bias fit in :mod:`mfdist.train.biases`,
   divided by the number of fit ratings. ``mu`` stays fixed: it is shared with
   every user outside the block. Early stopping on validation RMSE
   (``refine.patience``).
5. Accepted when the best validation RMSE beats the start's: the same solve on
   all the block's ratings, validation included, is refit for the chosen number
   of epochs, and exactly the sampled users' and items' rows of the model are
   replaced by a broadcast join of the refit rows. Not accepted: the trained
   model is published as it is, as with the stage off.

``refine.head: mlp`` also trains :class:`ResidualMLP` on the block, on top of
the frozen validation-chosen dot-product model (before the refit), to predict its
residual; its validation RMSE is reported as ``mlp_rmse`` and its weights and
config are saved under ``<output.root>/_runs/<run_id>/artifacts/``. Published
factors stay the dot-product model.

Precision: the dot-product model is float32 everywhere (its parameters are the
published float factors, and rank-sized gathers are memory-bound, so half
precision would lose digits and gain nothing); on CUDA only the MLP head's
matmuls run under bfloat16 autocast, its weights, loss and evaluation stay float32.

This is the only module that imports torch, so executors never need it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from tqdm import tqdm

from mfdist import lake
from mfdist import schema as S
from mfdist.config import Config
from mfdist.errors import ConfigError
from mfdist.foldin.job import fold_in, ridge_for
from mfdist.model import Model
from mfdist.train import EpochCallback, EpochRecord

log = logging.getLogger(__name__)

# Ratings per Adam step: a block up to this size is fitted full-batch.
BATCH_SIZE = 1 << 16
MLP_HIDDEN = (64, 32)
MLP_DROPOUT = 0.1
MLP_WEIGHT_DECAY = 1e-4
MLP_WEIGHTS = "refine_mlp.pt"
MLP_CONFIG = "refine_mlp.json"
HELD_OUT = "_held_out"


class RefineError(ConfigError):
    """The block cannot be refined as configured (too many or too few ratings, no such device)."""


@dataclass(frozen=True)
class Side:
    """One side of the block on the driver: indices (sorted), biases and factors."""

    idx: np.ndarray
    bias: np.ndarray
    factors: np.ndarray


@dataclass(frozen=True)
class Block:
    """The sampled block on the driver; ``rows``/``cols`` are positions into ``users``/``items``."""

    users: Side
    items: Side
    rows: np.ndarray
    cols: np.ndarray
    ratings: np.ndarray
    held_out: np.ndarray  # bool: the validation ratings (unseen by the start and the fit)


@dataclass(frozen=True)
class FitOutcome:
    rmse_before: float
    rmse_after: float
    best_epoch: int
    epochs: list[EpochRecord]


@dataclass
class RefineResult:
    """The model to publish (merged or unchanged), the block's indices (broadcast-sized frames) and metrics."""

    model: Model
    metrics: dict[str, float]
    epochs: list[EpochRecord]
    device: str
    accepted: bool
    block_users: DataFrame
    block_items: DataFrame

    @property
    def users(self) -> Optional[DataFrame]:
        """The user_idx of the rows replaced in ``model.users``; None when not merged."""
        return self.block_users if self.accepted else None

    @property
    def items(self) -> Optional[DataFrame]:
        """The item_idx of the rows replaced in ``model.items``; None when not merged."""
        return self.block_items if self.accepted else None


def resolve_device(setting: str) -> torch.device:
    """``refine.device``: auto is CUDA when torch sees a GPU, else CPU."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise RefineError("refine.device: cuda was asked for but torch.cuda.is_available() is false; use auto or cpu")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def sample_ids(ratings: DataFrame, *, idx_col: str, n: int, strategy: str, seed: int) -> list[int]:
    """The block's ``n`` indices on one side of ``ratings``: most rated first, or a seeded uniform draw."""
    counts = ratings.groupBy(idx_col).agg(F.count(F.lit(1)).alias("_n"))
    if strategy == "top_active":
        order = [F.col("_n").desc(), F.col(idx_col)]
    else:
        # The column name salts the hash so users and items with equal indices are drawn independently.
        order = [F.xxhash64(F.lit(seed), F.lit(idx_col), F.col(idx_col)), F.col(idx_col)]
    return [row[0] for row in counts.orderBy(*order).limit(n).select(idx_col).collect()]


def ids_frame(spark: SparkSession, ids: list[int], idx_col: str) -> DataFrame:
    return spark.createDataFrame([(i,) for i in ids], T.StructType([T.StructField(idx_col, T.IntegerType(), False)]))


@dataclass(frozen=True)
class BlockPlan:
    """The sampled block and the training ratings with the block's validation part flagged."""

    users: DataFrame  # user_idx of the block (refine.sample.users rows at most)
    items: DataFrame  # item_idx of the block
    ratings: DataFrame  # user_idx, item_idx, rating, _held_out: every training rating

    def fit_ratings(self, *, with_validation: bool) -> DataFrame:
        """The training ratings, with or without the block's validation part."""
        kept = self.ratings if with_validation else self.ratings.where(~F.col(HELD_OUT))
        return kept.drop(HELD_OUT)


def plan_block(train: DataFrame, cfg: Config) -> BlockPlan:
    """Sample the block from ``train`` (refine.sample.*) and flag a seeded share of its ratings for validation."""
    r, seed = cfg.refine, cfg.run.seed
    spark = train.sparkSession
    users, items = (
        ids_frame(spark, sample_ids(train, idx_col=idx, n=n, strategy=r.sample.strategy, seed=seed), idx)
        for idx, n in ((S.USER_IDX, r.sample.users), (S.ITEM_IDX, r.sample.items))
    )
    # A hash of (seed, user, item) rather than a row position: the flag does not depend on partitioning.
    share = F.pmod(F.xxhash64(F.lit(seed), F.lit(HELD_OUT), F.col(S.USER_IDX), F.col(S.ITEM_IDX)), F.lit(1 << 20)) / float(1 << 20)
    flagged = (
        train.select(S.USER_IDX, S.ITEM_IDX, S.RATING)
        .join(F.broadcast(users.withColumn("_in_u", F.lit(True))), S.USER_IDX, "left")
        .join(F.broadcast(items.withColumn("_in_i", F.lit(True))), S.ITEM_IDX, "left")
        .select(
            S.USER_IDX, S.ITEM_IDX, S.RATING,
            (F.col("_in_u").isNotNull() & F.col("_in_i").isNotNull() & (share < r.validation_fraction)).alias(HELD_OUT),
        )
    )
    return BlockPlan(users, items, flagged)


def _collect_side(model_side: DataFrame, ids: DataFrame, idx_col: str) -> Side:
    """The sampled rows of a model side, sorted by index (bounded by refine.sample.*)."""
    pdf = model_side.join(F.broadcast(ids), idx_col).select(idx_col, S.BIAS, S.FACTORS).toPandas().sort_values(idx_col)
    return Side(
        idx=pdf[idx_col].to_numpy(np.int64),
        bias=pdf[S.BIAS].to_numpy(np.float32),
        factors=np.stack(pdf[S.FACTORS].to_numpy()).astype(np.float32) if len(pdf) else np.zeros((0, 0), np.float32),
    )


def block_ratings(plan: BlockPlan, *, max_ratings: int) -> DataFrame:
    """The block's training ratings, counted in Spark first: a block over ``max_ratings`` is refused before any work."""
    ratings = plan.ratings.join(F.broadcast(plan.users), S.USER_IDX).join(F.broadcast(plan.items), S.ITEM_IDX)
    n = ratings.count()
    if n > max_ratings:
        raise RefineError(
            f"refine.sample.max_ratings: the sampled block holds {n:,} training ratings, more than "
            f"refine.sample.max_ratings={max_ratings:,}; lower refine.sample.users or refine.sample.items, "
            "or raise refine.sample.max_ratings if the block fits the device memory"
        )
    return ratings


def _sides(plan: BlockPlan, model: Model) -> tuple[Side, Side]:
    """``model``'s rows for the block's users and items."""
    return _collect_side(model.users, plan.users, S.USER_IDX), _collect_side(model.items, plan.items, S.ITEM_IDX)


def gather_block(ratings: DataFrame, plan: BlockPlan, model: Model) -> Block:
    """The block on the driver: its ``ratings`` (from :func:`block_ratings`) and ``model``'s rows for them."""
    user_side, item_side = _sides(plan, model)
    pdf = ratings.select(S.USER_IDX, S.ITEM_IDX, S.RATING, HELD_OUT).toPandas()
    # Partition order is not deterministic; sorting makes the fit order reproducible.
    pdf = pdf.sort_values([S.USER_IDX, S.ITEM_IDX], kind="stable")
    held_out = pdf[HELD_OUT].to_numpy(bool)
    if held_out.all() or not held_out.any():
        raise RefineError(
            f"refine.sample: the sampled block holds {len(pdf)} ratings, {int(held_out.sum())} of them "
            "for validation: too few to fit and validate; raise refine.sample.users, refine.sample.items or "
            "refine.validation_fraction, or use refine.sample.strategy=top_active"
        )
    return Block(
        users=user_side,
        items=item_side,
        rows=np.searchsorted(user_side.idx, pdf[S.USER_IDX].to_numpy()),
        cols=np.searchsorted(item_side.idx, pdf[S.ITEM_IDX].to_numpy()),
        ratings=pdf[S.RATING].to_numpy(np.float32),
        held_out=held_out,
    )


class DotModel(torch.nn.Module):
    """``mu + b_u + b_i + p_u . q_i`` on the block; ``mu`` is a fixed buffer because it is shared with every user."""

    def __init__(self, mu: float, block: Block, *, train_biases: bool):
        super().__init__()
        self.register_buffer("mu", torch.tensor(mu, dtype=torch.float32))
        self.user_bias = torch.nn.Parameter(torch.from_numpy(block.users.bias.copy()), requires_grad=train_biases)
        self.item_bias = torch.nn.Parameter(torch.from_numpy(block.items.bias.copy()), requires_grad=train_biases)
        self.user_factors = torch.nn.Parameter(torch.from_numpy(block.users.factors.copy()))
        self.item_factors = torch.nn.Parameter(torch.from_numpy(block.items.factors.copy()))

    def _predict(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predictions and the gathered factors; index_select's backward is several times faster on CPU than indexing."""
        p, q = self.user_factors.index_select(0, rows), self.item_factors.index_select(0, cols)
        bias = self.user_bias.index_select(0, rows) + self.item_bias.index_select(0, cols)
        return self.mu + bias + (p * q).sum(-1), p, q

    def forward(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return self._predict(rows, cols)[0]

    def objective(self, rows: torch.Tensor, cols: torch.Tensor, y: torch.Tensor, *, reg: float, bias_reg_per_rating: float) -> torch.Tensor:
        """The per-rating regularized squared error (see the module docstring)."""
        pred, p, q = self._predict(rows, cols)
        err = pred - y
        l2 = ((p * p).sum(-1) + (q * q).sum(-1)).mean()
        bias_l2 = self.user_bias.pow(2).sum() + self.item_bias.pow(2).sum()
        return (err * err).mean() + reg * l2 + bias_reg_per_rating * bias_l2


class ResidualMLP(torch.nn.Module):
    """An MLP over ``[p_u, q_i, p_u * q_i]`` (ReLU, dropout) predicting the dot-product model's residual."""

    def __init__(self, rank: int, hidden: tuple[int, ...] = MLP_HIDDEN, dropout: float = MLP_DROPOUT):
        super().__init__()
        layers: list[torch.nn.Module] = []
        width = 3 * rank
        for h in hidden:
            layers += [torch.nn.Linear(width, h), torch.nn.ReLU(), torch.nn.Dropout(dropout)]
            width = h
        out = torch.nn.Linear(width, 1)
        # A zero output layer starts the head at the dot-product model; its first step already moves it.
        torch.nn.init.zeros_(out.weight)
        torch.nn.init.zeros_(out.bias)
        self.net = torch.nn.Sequential(*layers, out)

    def forward(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([p, q, p * q], dim=-1)).squeeze(-1)


def clipped_rmse(pred: torch.Tensor, y: torch.Tensor, rating_range: list[float]) -> float:
    """RMSE of predictions clipped to the rating range, as :func:`mfdist.evaluate.predict` clips them."""
    err = pred.clamp(rating_range[0], rating_range[1]) - y
    return float(torch.sqrt((err * err).mean()))


def _train_epochs(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, batch_loss: Callable[[torch.Tensor], torch.Tensor], *, n_fit: int, seed: int
) -> Iterator[float]:
    """Endless epochs of ``optimizer`` over shuffled mini-batches of ``n_fit`` ratings; yields each epoch's mean loss."""
    shuffle = torch.Generator().manual_seed(seed)
    device = next(module.parameters()).device
    while True:
        module.train()
        order = torch.randperm(n_fit, generator=shuffle).to(device)
        total = torch.zeros((), device=device)
        for start in range(0, n_fit, BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            optimizer.zero_grad(set_to_none=True)
            loss = batch_loss(batch)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(batch)
        module.eval()
        yield float(total) / n_fit


def _fit(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    evaluate: Callable[[], tuple[float, float]],
    *,
    n_fit: int,
    epochs: int,
    patience: int,
    seed: int,
    label: str,
    callback: EpochCallback | None = None,
) -> FitOutcome:
    """Up to ``epochs`` epochs on the fit part, early-stopped on validation RMSE; keeps the best state."""
    module.eval()
    rmse_before = best = evaluate()[1]
    best_state, best_epoch, stale, records = copy.deepcopy(module.state_dict()), 0, 0, []
    lr = optimizer.param_groups[0]["lr"]
    bar = tqdm(total=epochs, desc=label, disable=not sys.stderr.isatty(), leave=False)
    started = time.perf_counter()
    for epoch, loss in zip(range(1, epochs + 1), _train_epochs(module, optimizer, batch_loss, n_fit=n_fit, seed=seed)):
        train_rmse, val_rmse = evaluate()
        record = EpochRecord(epoch, loss, train_rmse, val_rmse, lr, time.perf_counter() - started)
        records.append(record)
        if callback:
            callback(record)
        if bar.disable:
            log.info("%s epoch %d: loss=%.4f fit_rmse=%.4f val_rmse=%.4f lr=%g %.3f s",
                     label, epoch, record.loss, train_rmse, val_rmse, lr, record.seconds)
        bar.update(1)
        bar.set_postfix(val_rmse=f"{val_rmse:.4f}")
        if val_rmse < best:
            best, best_state, best_epoch, stale = val_rmse, copy.deepcopy(module.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= patience:
                break
        started = time.perf_counter()
    bar.close()
    module.load_state_dict(best_state)
    module.eval()
    return FitOutcome(rmse_before, best, best_epoch, records)


@dataclass(frozen=True)
class BlockTensors:
    """The block's ratings on the device, split into fit and validation parts."""

    rows: torch.Tensor
    cols: torch.Tensor
    y: torch.Tensor
    fit: torch.Tensor
    val: torch.Tensor


def block_tensors(block: Block, device: torch.device) -> BlockTensors:
    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return BlockTensors(
        rows=t(block.rows.astype(np.int64)),
        cols=t(block.cols.astype(np.int64)),
        y=t(block.ratings),
        fit=t(np.flatnonzero(~block.held_out)),
        val=t(np.flatnonzero(block.held_out)),
    )


def _dot_loss(dot: DotModel, data: BlockTensors, part: torch.Tensor, cfg: Config) -> Callable[[torch.Tensor], torch.Tensor]:
    """The objective of ``dot`` on a mini-batch of positions into ``part`` (the ratings it fits)."""
    t = cfg.train
    bias_reg_per_rating = t.bias_reg / len(part)

    def batch_loss(batch: torch.Tensor) -> torch.Tensor:
        i = part[batch]
        return dot.objective(data.rows[i], data.cols[i], data.y[i], reg=t.reg, bias_reg_per_rating=bias_reg_per_rating)

    return batch_loss


def _adam(dot: DotModel, cfg: Config) -> torch.optim.Optimizer:
    return torch.optim.Adam([p for p in dot.parameters() if p.requires_grad], lr=cfg.refine.lr)


def refine_dot(dot: DotModel, data: BlockTensors, cfg: Config, *, callback: EpochCallback | None = None) -> FitOutcome:
    """Fine-tune ``dot`` in place on the fit part; it ends holding the best validation state."""
    r = cfg.refine

    def evaluate() -> tuple[float, float]:
        with torch.no_grad():
            pred = dot(data.rows, data.cols)
        return tuple(clipped_rmse(pred[part], data.y[part], cfg.input.rating_range) for part in (data.fit, data.val))

    return _fit(
        dot, _adam(dot, cfg), _dot_loss(dot, data, data.fit, cfg), evaluate,
        n_fit=len(data.fit), epochs=r.epochs, patience=r.patience, seed=cfg.run.seed, label="refine", callback=callback,
    )


def refit_dot(dot: DotModel, data: BlockTensors, cfg: Config, *, epochs: int) -> None:
    """Fit ``dot`` in place on all the block's ratings, validation included, for the validation-chosen ``epochs``."""
    everything = torch.arange(len(data.y), device=data.y.device)
    batches = _train_epochs(dot, _adam(dot, cfg), _dot_loss(dot, data, everything, cfg), n_fit=len(everything), seed=cfg.run.seed)
    for _, loss in zip(range(epochs), batches):
        log.debug("refine refit: loss=%.4f", loss)


def fit_head(dot: DotModel, data: BlockTensors, cfg: Config) -> tuple[ResidualMLP, FitOutcome]:
    """Train a ResidualMLP on the block on top of the frozen ``dot``; returns it at its best validation state."""
    r = cfg.refine
    device = dot.mu.device
    with torch.no_grad():
        base = dot(data.rows, data.cols)
        p, q = dot.user_factors.index_select(0, data.rows), dot.item_factors.index_select(0, data.cols)
    torch.manual_seed(cfg.run.seed)
    head = ResidualMLP(dot.user_factors.shape[1]).to(device)

    def batch_loss(batch: torch.Tensor) -> torch.Tensor:
        i = data.fit[batch]
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = head(p[i], q[i])
        err = base[i] + out.float() - data.y[i]
        return (err * err).mean()

    def evaluate() -> tuple[float, float]:
        with torch.no_grad():
            pred = base + head(p, q)
        return tuple(clipped_rmse(pred[part], data.y[part], cfg.input.rating_range) for part in (data.fit, data.val))

    optimizer = torch.optim.AdamW(head.parameters(), lr=r.lr, weight_decay=MLP_WEIGHT_DECAY)
    outcome = _fit(head, optimizer, batch_loss, evaluate, n_fit=len(data.fit), epochs=r.epochs,
                   patience=r.patience, seed=cfg.run.seed, label="refine mlp")
    return head, outcome


def save_head(spark: SparkSession, head: ResidualMLP, outcome: FitOutcome, cfg: Config, *, dot_rmse: float) -> str:
    """Write the head's state_dict and a JSON of its config to ``<output.root>/_runs/<run_id>/artifacts/``."""
    dest = lake.artifacts_path(cfg.output.root, cfg.run.run_id)
    config = {
        "model": "ResidualMLP",
        "input": "concat(p_u, q_i, p_u * q_i)",
        "predicts": "residual of mu + b_u + b_i + p_u . q_i (the block's validation-chosen factors, before the refit)",
        "rank": head.net[0].in_features // 3,
        "hidden": list(MLP_HIDDEN),
        "activation": "relu",
        "dropout": MLP_DROPOUT,
        "optimizer": "AdamW",
        "lr": cfg.refine.lr,
        "weight_decay": MLP_WEIGHT_DECAY,
        "best_epoch": outcome.best_epoch,
        "validation_rmse": outcome.rmse_after,
        "dot_validation_rmse": dot_rmse,
        "run_id": cfg.run.run_id,
    }
    fs = lake.FileSystem(spark, dest)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({k: v.cpu() for k, v in head.state_dict().items()}, os.path.join(tmp, MLP_WEIGHTS))
        with open(os.path.join(tmp, MLP_CONFIG), "w") as f:
            json.dump(config, f, indent=2)
        for name in (MLP_WEIGHTS, MLP_CONFIG):
            fs.copy_from_local(os.path.join(tmp, name), f"{dest}/{name}")
    return dest


def _side_frame(spark: SparkSession, side: Side, bias: torch.Tensor, factors: torch.Tensor, schema: T.StructType) -> DataFrame:
    """The refined rows of one side as a model frame (broadcast-sized: refine.sample.* rows)."""
    b, f = bias.detach().cpu().numpy(), factors.detach().cpu().numpy()
    return spark.createDataFrame([(int(i), float(b[k]), f[k].tolist()) for k, i in enumerate(side.idx)], schema)


def merge_side(model_side: DataFrame, refined: DataFrame, *, idx_col: str) -> DataFrame:
    """``model_side`` with exactly the rows of ``refined`` (same schema, broadcast-sized) replaced."""
    new = refined.select(idx_col, F.col(S.BIAS).alias("_bias"), F.col(S.FACTORS).alias("_factors"))
    joined = model_side.join(F.broadcast(new), idx_col, "left")
    return joined.select(
        idx_col,
        F.coalesce("_bias", S.BIAS).alias(S.BIAS),
        F.coalesce("_factors", S.FACTORS).alias(S.FACTORS),
    )


def merged_model(spark: SparkSession, model: Model, block: Block, dot: DotModel) -> Model:
    """``model`` with the block's users' and items' rows replaced by ``dot``'s refined ones."""
    users = _side_frame(spark, block.users, dot.user_bias, dot.user_factors, S.MODEL_SCHEMA_USERS)
    items = _side_frame(spark, block.items, dot.item_bias, dot.item_factors, S.MODEL_SCHEMA_ITEMS)
    return Model(
        mu=model.mu,
        users=merge_side(model.users, users, idx_col=S.USER_IDX),
        items=merge_side(model.items, items, idx_col=S.ITEM_IDX),
        rank=model.rank,
    )


def _mean_counts(ratings: DataFrame) -> dict[str, float]:
    """Ratings per user and per item (DSGD's penalties scale with a row's count relative to them)."""
    row = ratings.agg(F.count(F.lit(1)).alias("n"), F.countDistinct(S.USER_IDX).alias("u"), F.countDistinct(S.ITEM_IDX).alias("i")).first()
    return {S.USER_IDX: row["n"] / max(row["u"], 1), S.ITEM_IDX: row["n"] / max(row["i"], 1)}


def resolve(ratings: DataFrame, plan: BlockPlan, model: Model, cfg: Config) -> Model:
    """``model`` with the block's users, then its items, re-solved on their ``ratings`` with the trainer's own
    penalties and the other side fixed (the fold-in solve); every other row as it was."""
    means = _mean_counts(ratings) if cfg.train.algorithm == "dsgd" else {S.USER_IDX: 1.0, S.ITEM_IDX: 1.0}
    for key, other, ids in ((S.USER_IDX, S.ITEM_IDX, plan.users), (S.ITEM_IDX, S.USER_IDX, plan.items)):
        users_side = key == S.USER_IDX
        solved = fold_in(
            ratings.join(F.broadcast(ids), key), model.items if users_side else model.users,
            key=key, other=other, mu=model.mu, rank=model.rank, ridge=ridge_for(cfg, mean_count=means[key]),
            broadcast_max_mb=cfg.output.broadcast_max_mb,
        ).cache()  # broadcast-sized (refine.sample.* rows); the items' solve reads the users'
        merged = merge_side(model.users if users_side else model.items, solved, idx_col=key)
        model = dataclasses.replace(model, **{"users" if users_side else "items": merged})
    return model


def with_factors(block: Block, plan: BlockPlan, model: Model) -> Block:
    """``block``'s ratings with ``model``'s biases and factors for its users and items (the same rows, so the same positions)."""
    users, items = _sides(plan, model)
    return dataclasses.replace(block, users=users, items=items)


def refine(plan: BlockPlan, model: Model, cfg: Config, *, callback: EpochCallback | None = None) -> RefineResult:
    """Refine the block of ``plan`` in the trained ``model``; merge its refit when validation RMSE improves on the start's."""
    r = cfg.refine
    spark = plan.ratings.sparkSession
    device = resolve_device(r.device)
    log.info("refine: device=%s%s", device, f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    ratings = block_ratings(plan, max_ratings=r.sample.max_ratings)
    start = resolve(plan.fit_ratings(with_validation=False), plan, model, cfg)
    block = gather_block(ratings, plan, start)
    data = block_tensors(block, device)
    log.info("refine: block of %d users x %d items, %d ratings (%d fit, %d validation), strategy=%s",
             len(block.users.idx), len(block.items.idx), len(block.ratings), len(data.fit), len(data.val), r.sample.strategy)

    dot = DotModel(model.mu, block, train_biases=cfg.train.biases).to(device)
    outcome = refine_dot(dot, data, cfg, callback=callback)
    accepted = outcome.rmse_after < outcome.rmse_before
    log.info("refine: validation rmse %.4f -> %.4f (best epoch %d of %d): %s", outcome.rmse_before, outcome.rmse_after,
             outcome.best_epoch, len(outcome.epochs),
             "merged after a refit with the validation ratings" if accepted else "not merged, the trained model is kept")
    metrics = {
        "rmse_before": outcome.rmse_before,
        "rmse_after": outcome.rmse_after,
        "best_epoch": outcome.best_epoch,
        "users": len(block.users.idx),
        "items": len(block.items.idx),
        "ratings": len(block.ratings),
        "validation_ratings": int(block.held_out.sum()),
        "device_cuda": float(device.type == "cuda"),
        "accepted": float(accepted),
    }
    if r.head == "mlp":
        # `dot` holds its best validation state (the start when not accepted); neither has seen the validation ratings.
        head, head_outcome = fit_head(dot, data, cfg)
        metrics["mlp_rmse"] = head_outcome.rmse_after
        where = save_head(spark, head, head_outcome, cfg, dot_rmse=outcome.rmse_after)
        log.info("refine: mlp head validation rmse %.4f (dot product %.4f); weights in %s",
                 head_outcome.rmse_after, outcome.rmse_after, where)
    if accepted:
        # The same start and epochs on every rating of the block, so the published block has seen its validation ratings.
        everything = with_factors(block, plan, resolve(plan.fit_ratings(with_validation=True), plan, model, cfg))
        final = DotModel(model.mu, everything, train_biases=cfg.train.biases).to(device)
        refit_dot(final, data, cfg, epochs=outcome.best_epoch)
        model = merged_model(spark, model, everything, final)
    return RefineResult(model, metrics, outcome.epochs, str(device), accepted, plan.users, plan.items)
