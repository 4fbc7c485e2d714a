"""DSGD checkpoints: every epoch's factor blocks and the training state, through Spark and Hadoop only.

Layout under ``<run.checkpoint_dir>/<run_id>/dsgd/``::

    epoch-000003/part-*.parquet    one row per factor block (tasks.BLOCK_DDL), written by Spark's writer
    state/epoch-000003.json        the training state after epoch 3 (newest file wins)

The blocks are written and read with Spark's Parquet writer and reader and the
state with Hadoop's FileSystem, so any URI the cluster's Spark can write
(s3a://, abfss://, gs://, dbfs:/, hdfs://, viewfs://) holds checkpoints exactly as
it holds the lake. Spark's output commit protocol makes an epoch's folder
complete or absent, also when tasks are retried. Epochs chain in memory and
start again from the kept epoch's files every ``train.checkpoint_interval``
epochs, which cuts the lineage there; the model frames of a finished fit are
read from those files by tasks, so factors never pass through the driver.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Optional

import numpy as np
from pyspark import RDD, AccumulatorParam
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from mfdist import lake
from mfdist import schema as S
from mfdist.train.dsgd import tasks
from mfdist.train.dsgd.kernel import NO_ERRORS, BlockErrors
from mfdist.train.dsgd.layout import rows_of
from mfdist.train.dsgd.schedule import HELD, MOVING, Grid

if TYPE_CHECKING:
    from mfdist.train.warm import WarmStart

_STATE_FILE = re.compile(r"epoch-(\d{6})\.json")
_EPOCH_DIR = re.compile(r"epoch-(\d{6})")


@dataclass(frozen=True)
class TrainState:
    """What a resumed run needs: the last finished epoch and the epoch whose factors are kept."""

    epoch: int
    kept_epoch: int
    step_size: float
    loss: Optional[float]
    layout: dict
    mean_counts: list[float]  # mean ratings per trained held / moving row, for the penalty weights
    # train.early_stopping: the epoch of the lowest validation RMSE so far, that RMSE, and the
    # epochs since it (their factors are the fit's result; a resumed fit goes on counting).
    best_epoch: Optional[int] = None
    best_rmse: Optional[float] = None
    stale: int = 0
    # The kept epoch's training objective after each of the last epochs (train.tol's window).
    recent_losses: list[float] = field(default_factory=list)
    first_rollback: Optional[int] = None  # the first epoch the bold driver rolled back
    # train.tune_reg: the reg of the epochs from stage_start on, that stage's lowest validation RMSE and the
    # epochs since it, the reg of best_epoch, and whether the path has ended.
    reg: Optional[float] = None
    stage_start: int = 1
    stage_best: Optional[float] = None
    stage_stale: int = 0
    best_reg: Optional[float] = None
    tuned: bool = False


@dataclass(frozen=True)
class Rows:
    """Some rows of one side, by ascending global index."""

    idx: np.ndarray
    bias: np.ndarray
    vecs: np.ndarray

    @staticmethod
    def concat(reports: list[tasks.BlockReport], rank: int) -> "Rows":
        """The rows the blocks reported."""
        idx = np.concatenate([r.idx for r in reports] + [np.zeros(0, np.int32)])
        bias = np.concatenate([r.bias for r in reports] + [np.zeros(0, np.float32)])
        vecs = np.concatenate([r.vecs for r in reports] + [np.zeros((0, rank), np.float32)])
        order = np.argsort(idx)
        return Rows(idx[order], bias[order], vecs[order])


class _Reports(AccumulatorParam):
    """An accumulator of BlockReport lists (2 d small records per epoch)."""

    def zero(self, value: list) -> list:
        return []

    def addInPlace(self, a: list, b: list) -> list:
        a.extend(b)
        return a


def _warm_rows(spark: SparkSession, warm: WarmStart | None, grid: Grid, *, biases: bool) -> DataFrame:
    """The warm start's rows of both sides as (_kind, _block, _row, _wb bias, _wv factors); none without one."""
    if warm is None:
        return spark.createDataFrame([], tasks.WARM_DDL)
    bias = F.col(S.BIAS) if biases else F.lit(0.0)
    sides = [
        warm.side(grid.side_col(kind)).select(
            F.lit(kind).alias("_kind"), (F.col(grid.side_col(kind)) % grid.d).cast("int").alias("_block"),
            (F.col(grid.side_col(kind)) / grid.d).cast("int").alias("_row"), bias.cast("float").alias("_wb"),
            F.col(S.FACTORS).alias("_wv"),
        )
        for kind in (HELD, MOVING)
    ]
    return sides[0].unionByName(sides[1])


class CheckpointStore:
    """One fit's checkpoint folder (driver side: the tasks never open files themselves)."""

    def __init__(self, spark: SparkSession, uri: str):
        self.spark = spark
        self.uri = uri.rstrip("/")
        self.fs = lake.FileSystem(spark, self.uri)

    def epoch_path(self, epoch: int) -> str:
        return f"{self.uri}/epoch-{epoch:06d}"

    def write_blocks(self, epoch: int, blocks: RDD, grid: Grid, wanted: dict[str, np.ndarray], *, rank: int) -> tuple[BlockErrors, dict[str, Rows]]:
        """Write the factor blocks of ``epoch`` (an RDD of FactorBlock); this action runs the epoch.

        Returns the epoch's objective terms over all training ratings (summed on the driver in
        block order, so exactly reproducible) and the rows ``wanted`` per side (a bounded set: an
        evaluation sample's), both reported by the writing tasks (2 d small records).
        """
        report = self.spark.sparkContext.accumulator([], _Reports())
        rows = blocks.map(partial(tasks.reported_row, report=report, wanted=wanted, d=grid.d))
        # Uncompressed: the factors are floats, which snappy does not shrink but costs time on (0.1-0.2 s an epoch).
        self.spark.createDataFrame(rows, tasks.BLOCK_DDL).write.mode("overwrite").option("compression", "none").parquet(self.epoch_path(epoch))
        reports = sorted(report.value, key=lambda r: (r.kind, r.block))
        held = [r.errors for r in reports if r.kind == HELD]
        errors = BlockErrors(*(math.fsum(col) for col in zip(*held))) if held else NO_ERRORS
        return errors, {kind: Rows.concat([r for r in reports if r.kind == kind], rank) for kind in (HELD, MOVING)}

    def write_initial(self, ratings: DataFrame, grid: Grid, *, rank: int, seed: int, warm: WarmStart | None = None,
                      biases: bool = True) -> None:
        """Epoch 0: every block of both sides, built from its rows' rating counts (and the ``warm`` start's rows
        where it has them) by one task per block.

        The counts are counted per input task in numpy and summed per block, rather than by a
        grouping of the ratings per row in Spark: at 20M ratings those grouping stages took about
        8 s of JVM CPU beside the layout (the fit of 2 epochs: 37.9 -> 28.5 s).
        """
        # A row per block with no counts, so that a block without ratings is built too.
        every_block = self.spark.range(2 * grid.d).select(
            F.when(F.col("id") < grid.d, HELD).otherwise(MOVING).alias("_kind"), (F.col("id") % grid.d).cast("int").alias("_block"),
            F.lit(b"").alias("_rows"), F.lit(b"").alias("_n"),
        )
        sides = (F.col(grid.held_col).alias(HELD), F.col(grid.moving_col).alias(MOVING))
        counts = ratings.select(*sides).mapInArrow(partial(tasks.row_counts, d=grid.d), tasks.COUNTS_DDL).unionByName(every_block)
        build = partial(tasks.initial_block, grid=grid, rank=rank, seed=seed)
        warm_rows = _warm_rows(self.spark, warm, grid, biases=biases)
        blocks = counts.groupBy("_kind", "_block").cogroup(warm_rows.groupBy("_kind", "_block")).applyInArrow(build, tasks.BLOCK_DDL)
        blocks.write.mode("overwrite").parquet(self.epoch_path(0))

    def _rows(self, epoch: int) -> DataFrame:
        return self.spark.read.schema(tasks.BLOCK_DDL).parquet(self.epoch_path(epoch))

    def read_blocks(self, epoch: int, *, rank: int) -> RDD:
        """The factor blocks of ``epoch`` as an RDD of FactorBlock (their epoch errors reset)."""
        return rows_of(self._rows(epoch)).map(partial(tasks.from_row, rank=rank))

    def trained_rows(self, epoch: int) -> dict[str, int]:
        """Rows with training ratings per side (two numbers)."""
        rows = self._rows(epoch).groupBy("kind").agg(F.sum("trained").alias("n")).collect()
        return {r.kind: int(r.n) for r in rows}

    def model_frame(self, epoch: int, grid: Grid, *, idx_col: str, rank: int) -> DataFrame:
        """One side's model frame (idx, bias, factors) read by tasks from the blocks of ``epoch``."""
        kind = HELD if idx_col == grid.held_col else MOVING
        schema = S.MODEL_SCHEMA_USERS if idx_col == S.USER_IDX else S.MODEL_SCHEMA_ITEMS
        blocks = self._rows(epoch).where(F.col("kind") == kind).select("block", "vecs", "bias", "counts")
        return blocks.mapInArrow(partial(tasks.model_rows, d=grid.d, rank=rank, idx_col=idx_col), schema)

    def keep_only(self, epochs: set[int]) -> None:
        """Delete every epoch folder but those of ``epochs`` (also ones an interrupted fit left)."""
        for name in self.fs.list_dirs(self.uri):
            found = _EPOCH_DIR.fullmatch(name)
            if found and int(found.group(1)) not in epochs:
                self.fs.delete(f"{self.uri}/{name}")

    def read_state(self) -> Optional[TrainState]:
        """The state after the newest finished epoch, or None for a fit that never started."""
        folder = f"{self.uri}/state"
        files = sorted(name for name in self.fs.list_files(folder) if _STATE_FILE.fullmatch(name))
        if not files:
            return None
        return TrainState(**json.loads(self.fs.read_bytes(f"{folder}/{files[-1]}")))

    def write_state(self, state: TrainState) -> None:
        """A new state file per epoch, written under a temporary name and renamed: complete or absent."""
        path = f"{self.uri}/state/epoch-{state.epoch:06d}.json"
        tmp = f"{self.uri}/state/_{state.epoch:06d}.json.tmp"
        self.fs.write_bytes(tmp, json.dumps(asdict(state), sort_keys=True).encode())
        self.fs.delete(path)
        self.fs.rename(tmp, path)
