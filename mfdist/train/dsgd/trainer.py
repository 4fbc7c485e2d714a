"""The DSGD trainer: epochs of d sub-epochs, the bold driver, per-epoch checkpoints, evaluation, resume.

See :mod:`mfdist.train.dsgd` for the schedule and the Spark layout.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial, reduce
from typing import Optional

import numpy as np
from pyspark import RDD, StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from mfdist import lake
from mfdist import schema as S
from mfdist.config import Config, EarlyStoppingConfig, TrainConfig
from mfdist.errors import ConfigError
from mfdist.model import Model
from mfdist.session import task_slots
from mfdist.split import random_split, unit_hash
from mfdist.train import EpochCallback, EpochRecord, Trainer, TrainResult, check_finite
from mfdist.train.dsgd import tasks
from mfdist.train.dsgd.checkpoint import CheckpointStore, Rows, TrainState
from mfdist.train.dsgd.kernel import BlockErrors, sample_sse
from mfdist.train.dsgd.layout import Layout, identity, lay_out, zippable
from mfdist.train.dsgd.schedule import HELD, MOVING, Grid, grid_for, strata_order
from mfdist.train.warm import WarmStart

log = logging.getLogger(__name__)

BOLD_DRIVER_UP = 1.05
BOLD_DRIVER_DOWN = 0.5
# train.tol compares the objective with this many epochs before: a shorter window would see the bold
# driver's rolled-back epochs (no change) as convergence.
CONVERGENCE_EPOCHS = 3
# train.tune_reg's path, as multiples of train.reg, lowest first: a low reg leaves the small random
# start within a few epochs, and each higher one starts from the factors the lower one fitted.
REG_PATH = (0.25, 0.5, 1.0, 2.0, 4.0)


def sub_epoch(ratings: RDD, blocks: RDD, *, stratum: int, grid: Grid, step) -> RDD:
    """One stratum: partition t = step((task t's rating blocks, [the held and moving factor blocks they join])).

    ``ratings`` (cached) joins through a narrow zip; the factor blocks of ``blocks`` (the
    previous sub-epoch's output, or the epoch's checkpoint) arrive by the one shuffle.
    """
    routed = blocks.map(partial(tasks.route, stratum=stratum, grid=grid)).partitionBy(grid.tasks, identity).glom()
    return ratings.zip(zippable(routed)).flatMap(step)


def run_epoch(layout: Layout, hyper: tasks.Hyper, blocks: RDD, *, lr: float, seed: int, epoch: int) -> RDD:
    """The sub-epochs of ``epoch`` (one per stratum) from ``blocks`` (the kept factor blocks): the epoch's factor blocks, lazily."""
    grid = layout.grid
    blocks = blocks.map(tasks.fresh)
    step = partial(tasks.update, hyper=hyper, d=grid.d, lr=lr, seed=seed, epoch=epoch)
    for stratum in strata_order(seed, epoch, grid.tasks):
        blocks = sub_epoch(layout.ratings[stratum], blocks, stratum=stratum, grid=grid, step=step)
    return blocks


class DSGDTrainer(Trainer):
    """Stratified distributed SGD with a compiled block kernel, bold driver and per-epoch checkpoints."""

    def __init__(self, cfg: Config, *, warm: WarmStart | None = None):
        super().__init__(cfg)
        self.warm = warm
        if cfg.input.implicit:
            raise ConfigError(
                "train.algorithm: dsgd does not support implicit feedback (input.implicit: true) yet; "
                "use train.algorithm: als, which fits implicit ALS"
            )

    def fit(self, train: DataFrame, *, test: DataFrame | None = None, callback: EpochCallback | None = None) -> TrainResult:
        spark = train.sparkSession
        t, seed, run_id = self.cfg.train, self.cfg.run.seed, self.cfg.run.run_id
        es = t.early_stopping
        store = CheckpointStore(spark, f"{lake.checkpoint_path(self.cfg.run.checkpoint_dir, run_id)}/dsgd")
        previous = store.read_state()
        # Another seed than the split's: the validation slice is a uniform part of the training ratings.
        validating = es.enabled or t.tune_reg
        train, validation = random_split(train, test_fraction=es.validation_fraction, seed=seed + 2) if validating else (train, None)
        stats = _summary(train, validation, test)
        slots = task_slots(spark)
        d = t.blocks or (previous.layout["d"] if previous else slots)
        grid = grid_for(d, slots=slots, users=stats["users"], items=stats["items"], user_col=S.USER_IDX, item_col=S.ITEM_IDX)
        mu = float(stats["mu"]) if t.biases else 0.0
        layout_key = {
            "d": d, "rank": t.rank, "held": grid.held_col, "n_held": grid.n_held, "n_moving": grid.n_moving, "biases": t.biases,
            "seed": seed, **({"validation_fraction": es.validation_fraction} if validating else {}),
            **({"tune_reg": True} if t.tune_reg else {}),
            **({"warm_start_run": self.warm.run_id} if self.warm else {}),
        }
        state = _resume_state(previous, layout_key, run_id, store)
        log.info(
            "dsgd: d=%d (%d tasks per sub-epoch) rank=%d reg=%g bias_reg=%g biases=%s held=%s (%d) moving=%s (%d) %s",
            d, grid.tasks, t.rank, t.reg, t.bias_reg, t.biases, grid.held_col, grid.n_held, grid.moving_col, grid.n_moving,
            f"resuming after epoch {state.epoch}" if state else f"from run {self.warm.run_id}'s factors" if self.warm else "from scratch",
        )
        records: list[EpochRecord] = []
        if state is None or (state.epoch < t.epochs and _why_done(state, t) is None):
            # Independent jobs, submitted from threads so that Spark runs them side by side: their small
            # Python tasks leave slots idle one after another (the demo, 2 cores: 7.3 s of jobs in a row).
            with ThreadPoolExecutor(max_workers=4) as pool:
                started = pool.submit(self._start, store, train, grid, layout_key, n_train=stats["n_train"]) if state is None else None
                laid_out = pool.submit(lay_out, train, grid, rank=t.rank, seed=seed)
                sampled = [pool.submit(_eval_sample, frame, rows=stats[f"n_{name}"], limit=t.eval_sample, seed=seed)
                           for name, frame in (("test", test), ("validation", validation))]
            state = started.result() if started else state
            layout = laid_out.result()
            samples = Samples(*(future.result() for future in sampled))
            hyper = tasks.Hyper(
                rank=t.rank, reg=t.reg, bias_reg=t.bias_reg, biases=t.biases, mu=mu, rating_range=tuple(self.cfg.input.rating_range),
                mean_held=state.mean_counts[0], mean_moving=state.mean_counts[1],
            )
            kept: Optional[KeptBlocks] = None
            try:
                for epoch in range(state.epoch + 1, t.epochs + 1):
                    state, record, kept = self._epoch(layout, hyper, store, state, epoch, samples, kept)
                    records.append(record)
                    if callback:
                        callback(record)
                    done = _why_done(state, t)
                    if done:
                        log.info("dsgd: %s after epoch %d", done, epoch)
                        break
            finally:
                layout.unpersist()
                if kept is not None:
                    kept.rdd.unpersist()
        # With early stopping the best validation epoch, else the last kept one (the bold driver's).
        final = state.best_epoch if state.best_epoch is not None else state.kept_epoch
        model = _model(store, final, grid, mu=mu, rank=t.rank)
        model.users.cache()
        model.items.cache()
        check_finite(model)
        return TrainResult(model, records, metrics=_stopping_metrics(state, t, final))

    def _start(self, store: CheckpointStore, train: DataFrame, grid: Grid, layout_key: dict, *, n_train: int) -> TrainState:
        """Write epoch 0 (initial factors, or the warm start's where it has them) and the first state."""
        t = self.cfg.train
        store.write_initial(train, grid, rank=t.rank, seed=self.cfg.run.seed, warm=self.warm, biases=t.biases)
        trained = store.trained_rows(0)
        means = [n_train / max(trained.get(kind, 0), 1) for kind in (HELD, MOVING)]
        state = TrainState(epoch=0, kept_epoch=0, step_size=t.step_size, loss=None, layout=layout_key, mean_counts=means,
                           reg=t.reg * REG_PATH[0] if t.tune_reg else None)
        store.write_state(state)
        return state

    def _epoch(self, layout: Layout, hyper: tasks.Hyper, store: CheckpointStore, state: TrainState, epoch: int,
               samples: Samples, kept: Optional[KeptBlocks]) -> tuple[TrainState, EpochRecord, Optional[KeptBlocks]]:
        """Train one epoch from the kept factors, checkpoint it, and keep or roll it back (bold driver).

        The kept epoch's blocks are taken from memory, or from its checkpoint files at the start and
        every ``train.checkpoint_interval`` epochs, which bounds the lineage a lost block is
        recomputed through. Files stay for the kept epoch, the epoch that lineage starts from (the
        chain's base: an executor lost mid-chain recomputes its blocks from them) and the best
        validation epoch; the others go once the state no longer names them.
        """
        started = time.perf_counter()
        t, grid, lr = self.cfg.train, layout.grid, state.step_size
        if kept is None or kept.epochs_in_memory >= t.checkpoint_interval:
            if kept is not None:
                kept.rdd.unpersist()
            kept = KeptBlocks(store.read_blocks(state.kept_epoch, rank=t.rank), 0, base=state.kept_epoch)
        if state.reg is not None:
            hyper = replace(hyper, reg=state.reg)
        blocks = run_epoch(layout, hyper, kept.rdd, lr=lr, seed=self.cfg.run.seed, epoch=epoch).persist(StorageLevel.MEMORY_AND_DISK)
        score_test = samples.test is not None and (epoch % t.eval_every == 0 or epoch == t.epochs)
        errors, rows = store.write_blocks(epoch, blocks, grid, samples.wanted(grid, test=score_test), rank=t.rank)
        loss = (errors.sse + errors.penalty) / max(errors.count, 1)
        test_rmse = validation_rmse = None
        if math.isfinite(loss) and (state.loss is None or loss < state.loss):
            score = partial(EvalSample.rmse, grid=grid, rows=rows, mu=hyper.mu, rating_range=self.cfg.input.rating_range)
            test_rmse = score(samples.test) if score_test else None
            validation_rmse = score(samples.validation) if samples.validation is not None else None
            state = replace(state, epoch=epoch, kept_epoch=epoch, step_size=lr * BOLD_DRIVER_UP, loss=loss)
            finished, kept = kept.rdd, KeptBlocks(blocks, kept.epochs_in_memory + 1, base=kept.base)
        else:
            state = replace(state, epoch=epoch, step_size=lr * BOLD_DRIVER_DOWN,
                            first_rollback=state.first_rollback or epoch)
            log.warning("dsgd epoch %d: loss %s did not improve on %s; rolled back, step %g -> %g", epoch, loss, state.loss, lr, state.step_size)
            finished = blocks
        if samples.validation is not None:
            state = _track_best(state, epoch, validation_rmse, min_delta=t.early_stopping.min_delta)
        if t.tune_reg:
            state = _tune_reg(_track_stage(state, validation_rmse, min_delta=t.early_stopping.min_delta), t)
        state = replace(state, recent_losses=(state.recent_losses + [state.loss])[-CONVERGENCE_EPOCHS - 1:])
        # The state names the epochs to keep before the others' files go, so a kill in between resumes.
        store.write_state(state)
        store.keep_only({state.kept_epoch, kept.base} | ({state.best_epoch} if state.best_epoch is not None else set()))
        finished.unpersist()
        record = EpochRecord(
            epoch=epoch, loss=loss, train_rmse=_rmse(errors), test_rmse=test_rmse, step_size=lr, seconds=time.perf_counter() - started,
            validation_rmse=validation_rmse,
        )
        return state, record, kept


def _beats(rmse: Optional[float], best: Optional[float], min_delta: float) -> bool:
    """Whether a validation RMSE (None: a rolled-back epoch) improves on ``best`` by more than ``min_delta`` (Keras's rule)."""
    return rmse is not None and (best is None or rmse < best - min_delta)


def _track_best(state: TrainState, epoch: int, rmse: Optional[float], *, min_delta: float) -> TrainState:
    """The state after ``epoch`` with validation RMSE ``rmse`` (None: a rolled-back epoch, no improvement)."""
    if _beats(rmse, state.best_rmse, min_delta):
        return replace(state, best_epoch=epoch, best_rmse=rmse, best_reg=state.reg, stale=0)
    return replace(state, stale=state.stale + 1)


def _track_stage(state: TrainState, rmse: Optional[float], *, min_delta: float) -> TrainState:
    """The state after an epoch of the current reg's stage with validation RMSE ``rmse`` (None: rolled back)."""
    if _beats(rmse, state.stage_best, min_delta):
        return replace(state, stage_best=rmse, stage_stale=0)
    return replace(state, stage_stale=state.stage_stale + 1)


def _tune_reg(state: TrainState, t: TrainConfig) -> TrainState:
    """train.tune_reg: the state after an epoch, on the path's next reg once this reg's stage has ended.

    A stage ends when its own validation RMSE has not improved for train.early_stopping.patience
    epochs (a higher reg's stage first shrinks the factors the lower one fitted, and may pass the
    best so far only after some epochs) or its objective has converged (train.tol). The path ends
    at a stage that did not beat the stages before it, or after the highest reg; the fit keeps
    the best validation epoch.
    """
    if state.tuned or (state.stage_stale < t.early_stopping.patience and not _converged(state, t.tol)):
        return state
    regs = [t.reg * m for m in REG_PATH]
    nxt = next((r for r in regs if r > state.reg * (1 + 1e-9)), None)
    improved = state.best_epoch is not None and state.best_epoch >= state.stage_start
    if nxt is None or not improved:
        return replace(state, tuned=True)
    log.info("dsgd: train.tune_reg: reg %g -> %g after epoch %d (best validation RMSE %.4f at epoch %d)",
             state.reg, nxt, state.epoch, state.best_rmse, state.best_epoch)
    # A new objective: the bold driver and train.tol compare the epochs from here on only.
    return replace(state, reg=nxt, stage_start=state.epoch + 1, stage_best=None, stage_stale=0, loss=None, recent_losses=[])


def _stopped(state: TrainState, es: EarlyStoppingConfig) -> bool:
    return es.enabled and state.stale >= es.patience


def _why_done(state: TrainState, t: TrainConfig) -> Optional[str]:
    """Why the fit ends before train.epochs, or None while it goes on."""
    if t.tune_reg:
        chosen = state.best_reg if state.best_reg is not None else state.reg  # no scored epoch: the last stage's
        return f"train.tune_reg chose reg {chosen:g} (best validation epoch {state.best_epoch})" if state.tuned else None
    es = t.early_stopping
    if _stopped(state, es):
        return (f"stopped, no validation improvement for {es.patience} epochs; best epoch {state.best_epoch} "
                f"(RMSE {state.best_rmse:.4f})")
    if _converged(state, t.tol):
        return f"converged: the objective fell by less than train.tol={t.tol:g} over {CONVERGENCE_EPOCHS} epochs"
    return None


def _converged(state: TrainState, tol: float) -> bool:
    """Whether the kept objective fell by less than ``tol`` of itself over the last CONVERGENCE_EPOCHS epochs,
    all after the bold driver's first roll-back.

    Until then the step only grew, and a flat objective is the noise floor of too large a step
    (the halved steps after a roll-back still gain: the demo at train.blocks=1 flattened at epoch 14 with
    test RMSE 0.6402 and reached 0.6327 after its roll-backs).
    """
    losses = state.recent_losses
    annealed = state.first_rollback is not None and state.epoch - state.first_rollback >= CONVERGENCE_EPOCHS
    if tol <= 0 or not annealed or len(losses) <= CONVERGENCE_EPOCHS or losses[0] is None or not math.isfinite(losses[0]):
        return False
    return losses[0] - losses[-1] < tol * losses[0]


def _stopping_metrics(state: TrainState, t: TrainConfig, final: int) -> dict[str, float]:
    """``metrics`` rows of the fit: the epoch it kept, the epochs it ran, why it stopped before train.epochs."""
    figures = {"final_epoch": float(final), "epochs_run": float(state.epoch), "converged": float(_converged(state, t.tol)),
               # The reg the kept model was fitted with (train.tune_reg's choice): fold-in solves with it.
               "reg": state.best_reg if state.best_reg is not None else t.reg}
    if t.early_stopping.enabled:
        figures["stopped_early"] = float(_stopped(state, t.early_stopping))
    if state.best_rmse is not None:
        figures["validation_rmse"] = state.best_rmse
    return figures


@dataclass(frozen=True)
class KeptBlocks:
    """The kept epoch's factor blocks, persisted, and the epochs chained in memory since they were last read from files."""

    rdd: RDD
    epochs_in_memory: int
    base: int  # the epoch whose checkpoint files the chain was read from


def _rmse(err: BlockErrors) -> float:
    return math.sqrt(err.sse_clipped / err.count) if err.count else float("nan")


def _model(store: CheckpointStore, epoch: int, grid: Grid, *, mu: float, rank: int) -> Model:
    """The model of ``epoch``'s checkpoint (frames read by tasks)."""
    users = store.model_frame(epoch, grid, idx_col=S.USER_IDX, rank=rank)
    items = store.model_frame(epoch, grid, idx_col=S.ITEM_IDX, rank=rank)
    return Model(mu=mu, users=users, items=items, rank=rank)


def _summary(train: DataFrame, validation: DataFrame | None, test: DataFrame | None) -> dict:
    """Training count and mean, the other frames' counts, and the index ranges over all of them (one job, a row per frame)."""
    named = {"train": train, "validation": validation, "test": test}
    tagged = [frame.select(F.lit(name).alias("_f"), S.USER_IDX, S.ITEM_IDX, S.RATING) for name, frame in named.items() if frame is not None]
    union = reduce(DataFrame.unionByName, tagged)
    aggs = [F.count(F.lit(1)).alias("n"), F.avg(S.RATING).alias("mu"), F.max(S.USER_IDX).alias("u"), F.max(S.ITEM_IDX).alias("i")]
    rows = {r["_f"]: r for r in union.groupBy("_f").agg(*aggs).collect()}  # at most 3 rows
    ranges = [(r["u"] or 0, r["i"] or 0) for r in rows.values()]
    counts = {f"n_{name}": rows[name]["n"] if name in rows else 0 for name in named}
    mu = rows["train"]["mu"] if "train" in rows else None
    return {**counts, "mu": mu or 0.0, "users": max((u for u, _ in ranges), default=0) + 1,
            "items": max((i for _, i in ranges), default=0) + 1}


@dataclass(frozen=True)
class EvalSample:
    """At most ``train.eval_sample`` test ratings, held on the driver, for the per-epoch test RMSE."""

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    distinct: dict[str, np.ndarray] = field(default_factory=dict)

    def sides(self, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
        """The sample's (held, moving) indices."""
        return (self.users, self.items) if grid.held_col == S.USER_IDX else (self.items, self.users)

    def wanted(self, grid: Grid) -> dict[str, np.ndarray]:
        """The factor rows the sample needs, per side (found once)."""
        if not self.distinct:
            held, moving = self.sides(grid)
            self.distinct.update({HELD: np.unique(held), MOVING: np.unique(moving)})
        return self.distinct

    def rmse(self, grid: Grid, rows: dict[str, Rows], *, mu: float, rating_range: list[float]) -> float:
        """Test RMSE on the sample with the factor ``rows`` it needs (predictions clipped as in the evaluate stage)."""
        held, moving = self.sides(grid)
        h, m = rows[HELD], rows[MOVING]
        sse = sample_sse(held, moving, self.ratings, (h.idx, h.bias, h.vecs), (m.idx, m.bias, m.vecs), mu=mu,
                         rating_range=tuple(rating_range))
        return math.sqrt(sse / len(self.ratings))


@dataclass(frozen=True)
class Samples:
    """The bounded samples an epoch is scored on: test ratings, and the early-stopping validation slice."""

    test: Optional[EvalSample]
    validation: Optional[EvalSample]

    def wanted(self, grid: Grid, *, test: bool) -> dict[str, np.ndarray]:
        """The factor rows to report: the validation sample's, and the test sample's when ``test``."""
        chosen = [s.wanted(grid) for s in ((self.test if test else None), self.validation) if s is not None]
        if not chosen:
            return tasks.NOTHING_WANTED
        return {kind: np.union1d(*(w[kind] for w in chosen)) if len(chosen) > 1 else chosen[0][kind] for kind in (HELD, MOVING)}


def _eval_sample(test: DataFrame | None, *, rows: int, limit: int, seed: int) -> Optional[EvalSample]:
    """About ``limit`` of the ``rows`` test ratings, chosen by a seeded hash (all of them when fewer): a bounded collect.

    A threshold on the hash, not a sort by it (the sort cost the demo 2 s of task time for 100k of 184k
    ratings), set a few standard deviations above ``limit / rows`` so that the sample rarely falls short.
    """
    if test is None or not rows:
        return None
    share = (limit + 4 * math.sqrt(limit) + 4) / rows
    # Another seed than the split's, so the sample is uniform over the test ratings.
    kept = test if rows <= limit else test.where(unit_hash(seed + 1) < min(share, 1.0)).limit(limit)
    table = kept.select(S.USER_IDX, S.ITEM_IDX, S.RATING).toArrow()  # at most train.eval_sample rows
    if not table.num_rows:
        return None
    return EvalSample(*(table.column(c).to_numpy() for c in (S.USER_IDX, S.ITEM_IDX, S.RATING)))


def _resume_state(previous: TrainState | None, layout_key: dict, run_id: str, store: CheckpointStore) -> TrainState | None:
    """The checkpointed state when it matches this run's layout; a mismatch is a config error."""
    if previous is None:
        return None
    if previous.layout != layout_key:
        changed = sorted(k for k in layout_key if previous.layout.get(k) != layout_key[k])
        raise ConfigError(
            f"run.run_id {run_id}: the DSGD checkpoint under {store.uri} was written with other settings "
            f"({', '.join(f'{k}={previous.layout.get(k)}' for k in changed)}); resume with those or use a new run.run_id"
        )
    return previous
