"""Stage 4, train (``train.algorithm: dsgd``): stratified distributed SGD (Gemulla et al., KDD 2011).

Input: indexed training ratings (user_idx int, item_idx int, rating double) and,
optionally, indexed test ratings for per-epoch test RMSE. Output: a
:class:`~mfdist.train.Model` (mu; users and items frames of idx int, bias float,
factors array<float>, rows with training ratings only) and one
:class:`~mfdist.train.EpochRecord` per epoch.

Ratings are cut into d x d blocks by (user_idx mod d, item_idx mod d), d =
``train.blocks`` or ``spark.default.parallelism``. The larger side (usually
users) is *held*: block b of it lives in task b with the ratings of grid row b,
and never moves. The smaller side *moves*. Sub-epoch s of an epoch processes
stratum s = {(b, (b + s) mod d)}: d blocks that share no held block and no
moving block, so the d tasks update disjoint factor rows in parallel. An epoch
is d sub-epochs, with the order of strata shuffled per epoch (seeded).

Worked example (d = 2; six users, four items, nine ratings)::

                item 0  item 1  item 2  item 3
        user 0     5       .       3       .
        user 1     .       4       .       1
        user 2     2       .       .       4
        user 3     .       .       5       .
        user 4     .       3       .       .
        user 5     1       .       .       2

  Users are the larger side, so they are held: user block 0 = users {0, 2, 4},
  user block 1 = users {1, 3, 5}; item block 0 = items {0, 2}, item block 1 =
  items {1, 3}. A block stores local rows ``user_idx // 2`` and local columns
  ``item_idx // 2`` (``RatingBlock``: rows, cols, vals as columnar arrays)::

        block (0, 0): (u0,i0)=5 (u0,i2)=3 (u2,i0)=2      stratum 0, task 0
        block (1, 1): (u1,i1)=4 (u1,i3)=1 (u5,i3)=2      stratum 0, task 1
        block (0, 1): (u2,i3)=4 (u4,i1)=3                stratum 1, task 0
        block (1, 0): (u3,i2)=5 (u5,i0)=1                stratum 1, task 1

  ``ratings[s]`` is a cached RDD of d partitions whose partition b is block
  (b, (b + s) mod d); ``ratings[0]`` = [(0,0), (1,1)], ``ratings[1]`` = [(0,1), (1,0)].
  An epoch whose shuffled strata order is [1, 0] runs:

        sub-epoch 0, stratum 1: task 0 updates block (0,1): user block 0, item block 1
                                task 1 updates block (1,0): user block 1, item block 0
        item blocks move (partitionBy(d) to partition (item block - stratum) mod d):
                                item block 0 -> task 0, item block 1 -> task 1
        sub-epoch 1, stratum 0: task 0 updates block (0,0): user block 0, item block 0
                                task 1 updates block (1,1): user block 1, item block 1

  Every block is updated once per epoch; user block b stays in task b.

Spark layout: a sub-epoch is ``ratings[s].zip(held_and_previous).zip(moving)``
mapped through the numba kernel (:mod:`mfdist.train.kernel`). The rating
partitions are built once (one shuffle at layout time, then cached, each
``ratings[s]`` derived from one cached row-partitioned RDD so partition b of every
stratum is computed where row b's ratings were: the tasks of every sub-epoch
prefer that executor). The held factor blocks come from the previous
sub-epoch's output partition b through a narrow dependency; the only exchange
of a sub-epoch is the ``partitionBy(d)`` of the moving factor blocks, so
network traffic per sub-epoch is the size of the smaller factor matrix.

Step size: bold driver. After each epoch the objective (squared errors plus
penalties, see :mod:`mfdist.train.kernel`) is computed over all training
ratings; when it fell, the epoch is kept and the step grows 5%; when it rose or
is not finite, the epoch is rolled back and the step halved. A rolled-back
epoch still counts towards ``train.epochs``. Inside an epoch each row scales
that step by its AdaGrad factor (LIBMF's rule, see :mod:`mfdist.train.kernel`);
the per-row sums travel and are checkpointed with the factor blocks.

Checkpoints (lineage is cut there: each epoch starts from the files)::

    <run.checkpoint_dir>/<run_id>/dsgd/state.json              last finished epoch, step, loss
    <run.checkpoint_dir>/<run_id>/dsgd/epoch-0003/held/block-00001.npz
    <run.checkpoint_dir>/<run_id>/dsgd/epoch-0003/moving/block-00000.npz

written by the tasks through pyarrow's file systems (local, HDFS, S3, GCS). A
run started again with the same ``run.run_id`` resumes after the last finished
epoch; every random choice is a function of (run.seed, epoch, block), so the
result equals that of an uninterrupted run. Factors are never collected to the
driver: the model frames are read from the last kept epoch's files by tasks.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Iterator, NamedTuple, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from pyspark import RDD, StorageLevel
from pyspark.serializers import BatchedSerializer, CPickleSerializer
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from mfdist import schema as S
from mfdist.config import Config
from mfdist.errors import ConfigError
from mfdist.synth import splitmix64
from mfdist.train import EpochCallback, EpochRecord, Model, Trainer, TrainResult, check_finite
from mfdist.train.kernel import BlockErrors, RatingBlock, Side, evaluate_block, layout_block, penalty_weights, sgd_block

log = logging.getLogger(__name__)

# The factor penalty of a row grows as (its ratings)^0.6 rather than linearly: on
# MovieLens 100k this took u1 test RMSE from 0.921 to 0.918 at the same reg (see README).
FREQUENCY_EXPONENT = 0.6
# Initial factors ~ N(0, (INIT_SCALE / sqrt(rank))^2): the initial p.q has the same spread at
# every rank. With AdaGrad steps a small start converges fastest (synthetic benchmark: 6 epochs
# to ALS's RMSE at 0.1, 7 at 0.25, 12 at 1.0; MovieLens 100k is the same at 0.1 and 0.5).
INIT_SCALE = 0.1
BOLD_DRIVER_UP = 1.05
BOLD_DRIVER_DOWN = 0.5
HELD, MOVING = "held", "moving"


# ---- the schedule ---------------------------------------------------------------------------


def stratum_blocks(stratum: int, d: int) -> list[tuple[int, int]]:
    """The (held block, moving block) pairs of ``stratum``: task b updates (b, (b + stratum) mod d)."""
    return [(b, (b + stratum) % d) for b in range(d)]


def strata_order(seed: int, epoch: int, d: int) -> list[int]:
    """The order in which an epoch visits the d strata (a seeded permutation)."""
    return [int(s) for s in np.random.default_rng([seed, epoch, 0]).permutation(d)]


def moving_partition(block: int, stratum: int, d: int) -> int:
    """The task (partition) that updates moving ``block`` in ``stratum``."""
    return (block - stratum) % d


def _identity(key: int) -> int:
    return key


_ONE_PER_BATCH = BatchedSerializer(CPickleSerializer(), 1)


def _zippable(rdd: RDD) -> RDD:
    """``rdd`` pickled one element per batch (fused into its last Python map).

    PySpark's ``zip`` re-pickles both sides in an extra Python pass unless they share a fixed
    batch size; every RDD zipped here holds one large block per partition.
    """
    return rdd._reserialize(_ONE_PER_BATCH)


# ---- blocks and their files -----------------------------------------------------------------


class FactorBlock(NamedTuple):
    """Block ``block`` of one side: local row r is global index ``block + d * r``."""

    block: int
    vecs: np.ndarray  # float32 (n, rank)
    bias: np.ndarray  # float32 (n,)
    counts: np.ndarray  # int32 (n,) training ratings per row; 0 = untrained, not published
    grad_sq: np.ndarray  # float32 (n,) the rows' AdaGrad sums (see mfdist.train.kernel)


_BLOCK_ARRAYS = FactorBlock._fields[1:]  # what a checkpoint file holds: all but the block number


@dataclass(frozen=True)
class Grid:
    """The d x d blocking; ``held`` is the larger side."""

    d: int
    n_held: int
    n_moving: int
    held_col: str
    moving_col: str

    def block_rows(self, kind: str, block: int) -> int:
        """Rows of ``block`` of the held or moving side (indices block, block + d, ... below the side's size)."""
        n = self.n_held if kind == HELD else self.n_moving
        return max(0, -(-(n - block) // self.d))


@dataclass(frozen=True)
class Hyper:
    """Everything a task needs besides its blocks (small, shipped with the closures)."""

    rank: int
    reg: float
    bias_reg: float
    biases: bool
    mu: float
    rating_range: tuple[float, float]
    mean_held: float  # mean ratings per trained row, for the penalty weights
    mean_moving: float

    def side(self, fb: FactorBlock, kind: str) -> Side:
        mean = self.mean_held if kind == HELD else self.mean_moving
        reg, bias_reg = penalty_weights(fb.counts, reg=self.reg, bias_reg=self.bias_reg, exponent=FREQUENCY_EXPONENT, mean_count=mean)
        return Side(fb.vecs, fb.bias, reg, bias_reg, fb.grad_sq)


def _absolute(uri: str) -> str:
    """A URI pyarrow accepts: local relative paths become absolute (resolved on the driver)."""
    return uri if "://" in uri or uri.startswith("file:") else os.path.abspath(uri)


@dataclass(frozen=True)
class CheckpointStore:
    """Factor blocks per epoch and the training state under one run's folder (any pyarrow file system)."""

    uri: str

    def _fs(self) -> tuple[pafs.FileSystem, str]:
        return pafs.FileSystem.from_uri(self.uri)

    def _epoch_dir(self, base: str, epoch: int) -> str:
        return f"{base}/epoch-{epoch:04d}"

    def _write_atomic(self, path: str, data: bytes) -> None:
        fs, _ = self._fs()
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)

    def write_block(self, epoch: int, kind: str, fb: FactorBlock) -> None:
        _, base = self._fs()
        buf = io.BytesIO()
        np.savez(buf, **{name: getattr(fb, name) for name in _BLOCK_ARRAYS})
        self._write_atomic(f"{self._epoch_dir(base, epoch)}/{kind}/block-{fb.block:05d}.npz", buf.getvalue())

    def read_block(self, epoch: int, kind: str, block: int) -> FactorBlock:
        fs, base = self._fs()
        with fs.open_input_file(f"{self._epoch_dir(base, epoch)}/{kind}/block-{block:05d}.npz") as f:
            arrays = np.load(io.BytesIO(f.read()))
            return FactorBlock(block, *(arrays[name] for name in _BLOCK_ARRAYS))

    def drop_epoch(self, epoch: int) -> None:
        fs, base = self._fs()
        path = self._epoch_dir(base, epoch)
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)

    def read_state(self) -> Optional["TrainState"]:
        fs, base = self._fs()
        path = f"{base}/state.json"
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with fs.open_input_stream(path) as f:
            return TrainState(**json.loads(f.read()))

    def write_state(self, state: "TrainState") -> None:
        _, base = self._fs()
        self._write_atomic(f"{base}/state.json", json.dumps(asdict(state), sort_keys=True).encode())


@dataclass(frozen=True)
class TrainState:
    """What a resumed run needs: the last finished epoch and the epoch whose factors are kept."""

    epoch: int
    kept_epoch: int
    step_size: float
    loss: Optional[float]
    layout: dict
    mean_counts: list[float]  # mean ratings per trained held / moving row, for the penalty weights


# ---- task-side functions (module level so they pickle by reference) -------------------------


def _cut_chunks(batches: Iterator[pa.RecordBatch], *, d: int) -> Iterator[pa.RecordBatch]:
    """One input task's cells (_b, _s, _r, _c, _v) cut by (held block, stratum): a row of columnar bytes per piece.

    No sort and no Arrow grouping in Spark: the pieces of a block from all input tasks meet in
    one RDD shuffle (:func:`_grid_rows`), where the block is laid out.
    """
    found = [b for b in batches if b.num_rows]
    if not found:
        return
    table = pa.Table.from_batches(found)
    col = {name: table.column(name).to_numpy() for name in ("_b", "_s", "_r", "_c", "_v")}
    key = col["_b"].astype(np.int64) * d + col["_s"]
    order = np.argsort(key, kind="stable")
    starts = np.concatenate(([0], np.flatnonzero(np.diff(key[order])) + 1, [len(order)]))
    for lo, hi in zip(starts[:-1], starts[1:]):
        part = order[lo:hi]
        first = part[0]
        yield pa.RecordBatch.from_pydict({
            "_b": [int(col["_b"][first])], "_s": [int(col["_s"][first])],
            "rows": [col["_r"][part].astype(np.int32).tobytes()], "cols": [col["_c"][part].astype(np.int32).tobytes()],
            "vals": [col["_v"][part].astype(np.float32).tobytes()],
        }, schema=_CHUNK_SCHEMA)


_CHUNK_FIELDS = [("_b", pa.int32()), ("_s", pa.int32()), ("rows", pa.binary()), ("cols", pa.binary()), ("vals", pa.binary())]
_CHUNK_SCHEMA = pa.schema(_CHUNK_FIELDS)
_CHUNK_DDL = "_b int, _s int, rows binary, cols binary, vals binary"


def _unpack_chunk(row) -> tuple[int, tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    return row["_b"], (row["_s"], np.frombuffer(row["rows"], np.int32), np.frombuffer(row["cols"], np.int32), np.frombuffer(row["vals"], np.float32))


def _layout_row(items: Iterator[tuple[int, tuple]], *, rank: int, seed: int) -> Iterator[tuple[int, tuple[int, RatingBlock]]]:
    """The pieces of grid row b (one partition) joined per stratum and laid out: (b, (stratum, RatingBlock))."""
    pieces: dict[tuple[int, int], list] = {}
    for b, (stratum, rows, cols, vals) in items:
        pieces.setdefault((b, stratum), []).append((rows, cols, vals))
    for (b, stratum), parts in sorted(pieces.items()):
        rows, cols, vals = (np.concatenate(a) for a in zip(*parts))
        yield b, (stratum, layout_block(rows, cols, vals, rank=rank, seed=_block_seed(seed, stratum, b)))


def _block_seed(seed: int, *parts: int) -> int:
    key = np.uint64(seed)
    for p in parts:
        key = splitmix64(np.array([key ^ np.uint64(p)], dtype=np.uint64))[0]
    return int(key >> np.uint64(1))


_EMPTY = RatingBlock(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(1, np.int64))


def _pick_stratum(items: Iterator[tuple[int, tuple[int, RatingBlock]]], *, stratum: int) -> list[RatingBlock]:
    """The one block of a grid row that belongs to ``stratum`` (empty when it has no ratings)."""
    found = [block for _, (s, block) in items if s == stratum]
    return [found[0] if found else _EMPTY]


def _held_counts(b: int, items: Iterator[tuple[int, tuple[int, RatingBlock]]], *, grid: Grid) -> list[np.ndarray]:
    """Ratings per row of held block b, from the blocks of grid row b."""
    counts = np.zeros(grid.block_rows(HELD, b), np.int64)
    for _, (_, block) in items:
        counts += np.bincount(block.rows, minlength=len(counts))
    return [counts]


def _moving_counts(b: int, items: Iterator[tuple[int, tuple[int, RatingBlock]]], *, grid: Grid) -> list[tuple[int, np.ndarray]]:
    """Ratings per row of each moving block within grid row b, keyed by moving block."""
    out = []
    for _, (stratum, block) in items:
        j = (b + stratum) % grid.d
        out.append((j, np.bincount(block.cols, minlength=grid.block_rows(MOVING, j))))
    return out


def _initial_block(b: int, found: Iterator[np.ndarray], *, kind: str, grid: Grid, rank: int, seed: int, store: CheckpointStore) -> list[int]:
    """Write block b of one side for epoch 0 (random factors, zero biases); returns its trained rows."""
    size = grid.block_rows(kind, b)
    counts = sum(found, np.zeros(size, np.int64)).astype(np.int32)
    rng = np.random.default_rng([seed, 0 if kind == HELD else 1, b])
    vecs = (rng.standard_normal((size, rank)) * (INIT_SCALE / math.sqrt(rank))).astype(np.float32)
    vecs[counts == 0] = 0.0  # untrained rows predict with the bias model, as evaluate does
    store.write_block(0, kind, FactorBlock(b, vecs, np.zeros(size, np.float32), counts, np.ones(size, np.float32)))
    return [int((counts > 0).sum())]


def _update(ratings: RatingBlock, held: FactorBlock, moving: FactorBlock, *, hyper: Hyper, lr: float, seed: int, epoch: int, stratum: int, save: Optional[CheckpointStore]) -> tuple[FactorBlock, FactorBlock]:
    """One task of a sub-epoch: SGD over its block; returns (held block, moving block), updated.

    With ``save`` (the epoch's last sub-epoch) both blocks are final for the epoch and written
    to its checkpoint; a retried task writes the same bytes again (the pass is deterministic).
    """
    order = np.random.default_rng([seed, epoch, 1 + stratum, held.block]).permutation(ratings.n_sub)
    sgd_block(ratings, order, hyper.side(held, HELD), hyper.side(moving, MOVING), mu=hyper.mu, lr=lr, biases=hyper.biases)
    if save is not None:
        save.write_block(epoch, HELD, held)
        save.write_block(epoch, MOVING, moving)
    return held, moving


def _update_zipped(item, **kwargs) -> tuple[FactorBlock, FactorBlock]:
    """``_update`` on ((rating block, (held block, stale moving block)), moving block)."""
    (ratings, (held, _)), moving = item
    return _update(ratings, held, moving, **kwargs)


def _update_from_checkpoint(b: int, blocks: Iterator[RatingBlock], *, store: CheckpointStore, kept_epoch: int, d: int, **kwargs) -> list[tuple[FactorBlock, FactorBlock]]:
    """``_update`` for an epoch's first sub-epoch: task b reads its factor blocks from the kept checkpoint."""
    # Consume the whole input (one block): a Python worker whose input was left unread is not
    # reused, and a fresh one pays the imports and numba's cache load (about 1 s) every epoch.
    [ratings] = list(blocks)
    held = store.read_block(kept_epoch, HELD, b)
    moving = store.read_block(kept_epoch, MOVING, (b + kwargs["stratum"]) % d)
    return [_update(ratings, held, moving, **kwargs)]


def _errors(item, *, hyper: Hyper, with_test: bool, store: CheckpointStore, epoch: int, stratum: int, d: int) -> tuple[BlockErrors, Optional[BlockErrors]]:
    """Training (and test) error sums of one block under the factors of ``epoch``."""
    ratings, (held, _) = item
    moving = store.read_block(epoch, MOVING, (held.block + stratum) % d)
    train, test = ratings if with_test else (ratings, None)
    rows, cols = hyper.side(held, HELD), hyper.side(moving, MOVING)
    lo_hi = list(hyper.rating_range)
    on_test = evaluate_block(test, rows, cols, mu=hyper.mu, rating_range=lo_hi) if test is not None else None
    return evaluate_block(train, rows, cols, mu=hyper.mu, rating_range=lo_hi), on_test


def _factor_batches(batches: Iterator[pa.RecordBatch], *, store: CheckpointStore, epoch: int, kind: str, d: int, idx_col: str) -> Iterator[pa.RecordBatch]:
    """Model rows (idx, bias, factors) of the trained rows of the blocks named in ``batches``."""
    for batch in batches:
        for block in batch.column(0).to_pylist():
            fb = store.read_block(epoch, kind, block)
            keep = np.flatnonzero(fb.counts > 0)
            flat = pa.array(fb.vecs[keep].ravel(), pa.float32())
            factors = pa.FixedSizeListArray.from_arrays(flat, fb.vecs.shape[1]).cast(pa.list_(pa.field("element", pa.float32(), nullable=False)))
            yield pa.RecordBatch.from_arrays(
                [pa.array((block + d * keep).astype(np.int32)), pa.array(fb.bias[keep], pa.float32()), factors],
                names=[idx_col, S.BIAS, S.FACTORS],
            )


# ---- the trainer ----------------------------------------------------------------------------


@dataclass
class Layout:
    """The cached rating strata (and test strata) of one fit."""

    grid: Grid
    ratings: list[RDD]
    test: Optional[list[RDD]]

    def unpersist(self) -> None:
        for rdd in self.ratings + (self.test or []):
            rdd.unpersist()


class DSGDTrainer(Trainer):
    """Stratified distributed SGD with a compiled block kernel, bold driver and per-epoch checkpoints."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        if cfg.input.implicit:
            raise ConfigError(
                "train.algorithm: dsgd does not support implicit feedback (input.implicit: true) yet; "
                "use train.algorithm: als, which fits implicit ALS"
            )

    def fit(self, train: DataFrame, *, test: DataFrame | None = None, callback: EpochCallback | None = None) -> TrainResult:
        spark = train.sparkSession
        t, seed = self.cfg.train, self.cfg.run.seed
        store = CheckpointStore(_absolute(f"{self.cfg.run.checkpoint_dir.rstrip('/')}/{self.cfg.run.run_id}/dsgd"))
        previous = store.read_state()
        stats = _summary(train, test)
        d = t.blocks or (previous.layout["d"] if previous else spark.sparkContext.defaultParallelism)
        grid = _grid(d, stats)
        mu = float(stats["mu"]) if t.biases else 0.0
        layout_key = {"d": d, "rank": t.rank, "held": grid.held_col, "n_held": grid.n_held, "n_moving": grid.n_moving, "biases": t.biases, "seed": seed}
        state = _resume_state(previous, layout_key, self.cfg.run.run_id, store)
        log.info(
            "dsgd: d=%d rank=%d reg=%g bias_reg=%g biases=%s held=%s (%d) moving=%s (%d) %s",
            d, t.rank, t.reg, t.bias_reg, t.biases, grid.held_col, grid.n_held, grid.moving_col, grid.n_moving,
            f"resuming after epoch {state.epoch}" if state else "from scratch",
        )
        records: list[EpochRecord] = []
        if state is None or state.epoch < t.epochs:
            rows = _grid_rows(train, grid, rank=t.rank, seed=seed)
            if state is None:
                trained = _write_initial(rows, grid, store=store, rank=t.rank, seed=seed)
                means = [stats["n_train"] / max(n, 1) for n in trained]
                state = TrainState(epoch=0, kept_epoch=0, step_size=t.step_size, loss=None, layout=layout_key, mean_counts=means)
                store.write_state(state)
            test_rows = _grid_rows(test, grid, rank=t.rank, seed=seed) if test is not None else None
            layout = Layout(grid, _cut_strata(rows, d), _cut_strata(test_rows, d) if test_rows is not None else None)
            hyper = Hyper(
                rank=t.rank, reg=t.reg, bias_reg=t.bias_reg, biases=t.biases, mu=mu, rating_range=tuple(self.cfg.input.rating_range),
                mean_held=state.mean_counts[0], mean_moving=state.mean_counts[1],
            )
            try:
                for epoch in range(state.epoch + 1, t.epochs + 1):
                    state, record = self._epoch(layout, hyper, store, state, epoch)
                    records.append(record)
                    if callback:
                        callback(record)
            finally:
                layout.unpersist()
        model = Model(
            mu=mu,
            users=_model_frame(spark, store, state.kept_epoch, grid, S.USER_IDX).cache(),
            items=_model_frame(spark, store, state.kept_epoch, grid, S.ITEM_IDX).cache(),
            rank=t.rank,
        )
        check_finite(model)
        return TrainResult(model, records)

    def _epoch(self, layout: Layout, hyper: Hyper, store: CheckpointStore, state: TrainState, epoch: int) -> tuple[TrainState, EpochRecord]:
        """Train one epoch from the kept factors, checkpoint it, and keep or roll it back (bold driver)."""
        started = time.perf_counter()
        lr = state.step_size
        outs = run_epoch(layout, hyper, store, kept_epoch=state.kept_epoch, lr=lr, seed=self.cfg.run.seed, epoch=epoch)
        train_err, test_err = _evaluate(layout, hyper, outs[-1], store, epoch)
        for out in outs:
            out.unpersist()
        loss = (train_err.sse + train_err.penalty) / max(train_err.count, 1)
        if math.isfinite(loss) and (state.loss is None or loss < state.loss):
            store.drop_epoch(state.kept_epoch)
            state = replace(state, epoch=epoch, kept_epoch=epoch, step_size=lr * BOLD_DRIVER_UP, loss=loss)
        else:
            store.drop_epoch(epoch)
            state = replace(state, epoch=epoch, step_size=lr * BOLD_DRIVER_DOWN)
            log.warning("dsgd epoch %d: loss %s did not improve on %s; rolled back, step %g -> %g", epoch, loss, state.loss, lr, state.step_size)
        store.write_state(state)
        record = EpochRecord(
            epoch=epoch, loss=loss, train_rmse=_rmse(train_err), test_rmse=_rmse(test_err) if test_err else None,
            step_size=lr, seconds=time.perf_counter() - started,
        )
        return state, record


def run_epoch(layout: Layout, hyper: Hyper, store: CheckpointStore, *, kept_epoch: int, lr: float, seed: int, epoch: int) -> list[RDD]:
    """Run the d sub-epochs of ``epoch`` from the checkpoint of ``kept_epoch`` as one Spark job.

    Returns the persisted outputs of the sub-epochs; partition b of each is (held block b,
    the moving block task b updated). The last sub-epoch's tasks write the epoch's checkpoint.
    """
    d = layout.grid.d
    outs = []
    for i, stratum in enumerate(strata_order(seed, epoch, d)):
        kwargs = dict(hyper=hyper, lr=lr, seed=seed, epoch=epoch, stratum=stratum, save=store if i == d - 1 else None)
        if i == 0:
            # The epoch starts from the files: this cuts the lineage.
            first = partial(_update_from_checkpoint, store=store, kept_epoch=kept_epoch, d=d, **kwargs)
            out = _zippable(layout.ratings[stratum].mapPartitionsWithIndex(first, preservesPartitioning=True))
        else:
            out = sub_epoch(layout.ratings[stratum], out, move(out, stratum, d), partial(_update_zipped, **kwargs))
        # Persisted because both the next sub-epoch (held blocks, narrow) and the shuffle of the
        # moving blocks read it; each sub-epoch then runs inside the next one's shuffle-map stage.
        outs.append(out.persist(StorageLevel.MEMORY_AND_DISK))
    out.count()
    return outs


def sub_epoch(ratings: RDD, previous: RDD, moving: RDD, step) -> RDD:
    """One stratum: partition b = step(((rating block, (held block b, _)), moving block)).

    ``ratings`` is cached and ``previous`` (the last sub-epoch's output, whose first element is
    the held block) is joined through narrow zips; only ``moving`` arrives by a shuffle.
    """
    return _zippable(ratings.zip(previous).zip(moving).map(step))


def move(out: RDD, stratum: int, d: int) -> RDD:
    """The moving blocks of ``out`` sent to the tasks of ``stratum``: block j to partition (j - stratum) mod d."""
    keyed = out.map(lambda pair: (moving_partition(pair[1].block, stratum, d), pair[1]))
    return _zippable(keyed.partitionBy(d, _identity).values())


def _evaluate(layout: Layout, hyper: Hyper, out: RDD, store: CheckpointStore, epoch: int) -> tuple[BlockErrors, Optional[BlockErrors]]:
    """Error sums over all blocks: held blocks from ``out``, moving blocks from the epoch's checkpoint.

    One stage of d x d tasks; the task of (stratum s, partition b) reads moving block
    (b + s) mod d, so the moving side crosses the network d times, as in training.
    """
    d, with_test = layout.grid.d, layout.test is not None
    parts = []
    for stratum in range(d):
        ratings = layout.ratings[stratum].zip(layout.test[stratum]) if with_test else layout.ratings[stratum]
        errors = partial(_errors, hyper=hyper, with_test=with_test, store=store, epoch=epoch, stratum=stratum, d=d)
        parts.append(ratings.zip(out).map(errors))
    sums = out.context.union(parts).collect()  # d * d tuples of four numbers
    train = _total(s[0] for s in sums)
    return train, _total(s[1] for s in sums) if with_test else None


def _total(errors) -> BlockErrors:
    return BlockErrors(*(sum(col) for col in zip(*errors)))


def _rmse(err: BlockErrors) -> float:
    return math.sqrt(err.sse_clipped / err.count) if err.count else float("nan")


# ---- layout (once per fit) ------------------------------------------------------------------


def _summary(train: DataFrame, test: DataFrame | None) -> dict:
    """Training count and mean, and the index ranges over train and test (bounded results)."""
    aggs = [F.count(F.lit(1)).alias("n"), F.avg(S.RATING).alias("mu"), F.max(S.USER_IDX).alias("u"), F.max(S.ITEM_IDX).alias("i")]
    rows = [train.agg(*aggs).first()] + ([test.agg(*aggs).first()] if test is not None else [])
    users = max(r["u"] or 0 for r in rows) + 1
    items = max(r["i"] or 0 for r in rows) + 1
    return {"n_train": rows[0]["n"], "mu": rows[0]["mu"] or 0.0, "users": users, "items": items}


def _grid(d: int, stats: dict) -> Grid:
    if stats["users"] >= stats["items"]:
        return Grid(d, stats["users"], stats["items"], S.USER_IDX, S.ITEM_IDX)
    return Grid(d, stats["items"], stats["users"], S.ITEM_IDX, S.USER_IDX)


def _grid_rows(ratings: DataFrame, grid: Grid, *, rank: int, seed: int) -> RDD:
    """``ratings`` cut into blocks, persisted with grid row b in partition b as (b, (stratum, RatingBlock))."""
    d = grid.d
    held, moving = F.col(grid.held_col), F.col(grid.moving_col)
    cells = ratings.select(
        (held % d).cast("int").alias("_b"), ((moving % d - held % d + d) % d).cast("int").alias("_s"),
        (held / d).cast("int").alias("_r"), (moving / d).cast("int").alias("_c"), F.col(S.RATING).cast("float").alias("_v"),
    )
    chunks = cells.mapInArrow(partial(_cut_chunks, d=d), _CHUNK_DDL).rdd.map(_unpack_chunk)
    rows = chunks.partitionBy(d, _identity).mapPartitions(partial(_layout_row, rank=rank, seed=seed), preservesPartitioning=True)
    return rows.persist(StorageLevel.MEMORY_AND_DISK)


def _cut_strata(rows: RDD, d: int) -> list[RDD]:
    """d cached RDDs; partition b of the s-th is block (b, (b + s) mod d). Unpersists ``rows``.

    Each stratum is cut from the row-partitioned RDD by a narrow map, so partition b of every
    stratum is computed where grid row b was cached (and the held factor block b follows it).
    """
    strata = [
        _zippable(rows.mapPartitions(partial(_pick_stratum, stratum=s), preservesPartitioning=True)).persist(StorageLevel.MEMORY_AND_DISK)
        for s in range(d)
    ]
    rows.context.union(strata).count()
    rows.unpersist()
    return strata


def _write_initial(rows: RDD, grid: Grid, *, store: CheckpointStore, rank: int, seed: int) -> tuple[int, int]:
    """Epoch 0 of the checkpoint, written by tasks; returns the trained held and moving rows."""
    d = grid.d
    held = rows.mapPartitionsWithIndex(partial(_held_counts, grid=grid), preservesPartitioning=True)
    moving = rows.mapPartitionsWithIndex(partial(_moving_counts, grid=grid)).reduceByKey(np.add, d, _identity).values()
    write = partial(_initial_block, grid=grid, rank=rank, seed=seed, store=store)
    n_held = sum(held.mapPartitionsWithIndex(partial(write, kind=HELD)).collect())  # d numbers
    n_moving = sum(moving.mapPartitionsWithIndex(partial(write, kind=MOVING)).collect())
    return n_held, n_moving


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


def _model_frame(spark: SparkSession, store: CheckpointStore, epoch: int, grid: Grid, idx_col: str) -> DataFrame:
    """One side's model frame (idx, bias, factors) read by tasks from the checkpoint of ``epoch``."""
    kind = HELD if idx_col == grid.held_col else MOVING
    schema = S.MODEL_SCHEMA_USERS if idx_col == S.USER_IDX else S.MODEL_SCHEMA_ITEMS
    read = partial(_factor_batches, store=store, epoch=epoch, kind=kind, d=grid.d, idx_col=idx_col)
    return spark.range(grid.d, numPartitions=grid.d).select(F.col("id").cast(T.IntegerType())).mapInArrow(read, schema)
