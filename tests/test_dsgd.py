"""DSGD: the block kernel against numpy, the stratum schedule, the Spark plan of a sub-epoch,
the bold driver, resuming an interrupted run, and the job end to end with train.algorithm=dsgd."""

from __future__ import annotations

import base64
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from pyspark.sql import functions as F

from mfdist import lake
from mfdist import schema as S
from mfdist.config import load_config
from mfdist.errors import ConfigError
from mfdist.evaluate import rating_metrics
from mfdist.hashing import splitmix64
from mfdist.ingest import read_movielens
from mfdist.pipeline import run
from mfdist.split import random_split
from mfdist.synth import generate_ratings
from mfdist.train import make_trainer
from mfdist.train.dsgd import kernel as K
from mfdist.train.dsgd import layout as L
from mfdist.train.dsgd import schedule as D
from mfdist.train.dsgd import tasks
from mfdist.train.dsgd import trainer as trainer_module
from mfdist.train.dsgd.checkpoint import CheckpointStore, TrainState
from mfdist.train.dsgd.trainer import sub_epoch
from tests.conftest import VIEWFS

# ---- kernel ---------------------------------------------------------------------------------


def _random_block(rng: np.random.Generator, n_rows: int, n_cols: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cells = rng.choice(n_rows * n_cols, size=n, replace=False)
    return cells // n_cols, cells % n_cols, rng.integers(1, 6, size=n).astype(np.float32)


def _side(rng: np.random.Generator, counts: np.ndarray, rank: int) -> K.Side:
    reg, bias_reg = K.penalty_weights(counts, reg=0.05, bias_reg=1.0, exponent=0.6, mean_count=float(counts.mean()))
    vecs = (rng.standard_normal((len(counts), rank)) * 0.3).astype(np.float32)
    return K.Side(vecs, np.zeros(len(counts), np.float32), reg, bias_reg, np.ones(len(counts), np.float32))


def _copy(side: K.Side) -> K.Side:
    return K.Side(*(a.copy() for a in side))


@pytest.mark.parametrize("biases", [True, False])
def test_kernel_matches_the_numpy_reference(monkeypatch, biases):
    monkeypatch.setattr(K, "SUB_BLOCK_BYTES", 64)  # 16 x 16 sub-blocks, so the order matters
    rng = np.random.default_rng(3)
    rows, cols, vals = _random_block(rng, 50, 40, 400)
    block = K.layout_block(rows, cols, vals, rank=4, seed=5)
    assert block.n_sub > 4
    P, Q = _side(rng, np.bincount(rows, minlength=50), 4), _side(rng, np.bincount(cols, minlength=40), 4)
    P2, Q2, start = _copy(P), _copy(Q), P.vecs.copy()
    for _ in range(3):
        order = rng.permutation(block.n_sub)
        fast = K.sgd_block(block, order, P, Q, mu=3.0, lr=0.02, biases=biases, rating_range=(1.0, 5.0))
        slow = K.sgd_block_numpy(block, order, P2, Q2, mu=3.0, lr=0.02, biases=biases, rating_range=(1.0, 5.0))
        np.testing.assert_allclose(fast, slow, rtol=1e-4)
    for fast, slow in zip(P + Q, P2 + Q2):
        np.testing.assert_allclose(fast, slow, atol=1e-5)
    assert np.abs(P.vecs - start).max() > 0.01
    assert np.all(P.grad_sq[np.bincount(rows, minlength=50) > 0] > 1)  # AdaGrad sums grew on rated rows
    assert np.any(P.bias != 0) == biases


def test_layout_keeps_every_rating_in_sub_block_order_whatever_the_input_order(monkeypatch):
    monkeypatch.setattr(K, "SUB_BLOCK_BYTES", 64)
    rng = np.random.default_rng(1)
    rows, cols, vals = _random_block(rng, 60, 60, 500)
    block = K.layout_block(rows, cols, vals, rank=4, seed=9)
    shuffled = rng.permutation(len(rows))
    again = K.layout_block(rows[shuffled], cols[shuffled], vals[shuffled], rank=4, seed=9)
    for a, b in zip(block, again):
        np.testing.assert_array_equal(a, b)
    assert sorted(zip(block.rows, block.cols, block.vals)) == sorted(zip(rows, cols, vals))
    side = K.block_side(rows, cols, rank=4)
    for s in range(block.n_sub):
        lo, hi = block.offsets[s], block.offsets[s + 1]
        assert hi > lo
        assert len(set(block.rows[lo:hi] // side)) == 1 and len(set(block.cols[lo:hi] // side)) == 1
        assert np.all(np.diff(block.rows[lo:hi]) >= 0)  # by row inside a sub-block


@pytest.mark.parametrize("side", [16, 37, None])
def test_layout_orders_by_sub_block_row_and_the_cells_hash(side):
    """The compiled counting sorts give numpy's lexicographic order of (sub-block, row, splitmix64 of the cell)."""
    rng = np.random.default_rng(4)
    rows, cols, vals = _random_block(rng, 300, 90, 4000)
    rows = np.concatenate([rows, np.full(90, 299)])  # one row with more ratings than the insertion sort takes
    cols = np.concatenate([cols, np.arange(90)])
    rows, cols = np.unique(np.stack([rows, cols], 1), axis=0).T
    vals = rng.random(len(rows))
    block = K.layout_block(rows, cols, vals, rank=4, seed=13, side=side)
    side = side or K.block_side(rows, cols, rank=4)
    sub = (rows // side) * (cols.max() // side + 1) + cols // side
    cell = (rows.astype(np.uint64) << np.uint64(32)) | cols.astype(np.uint64)
    order = np.lexsort((splitmix64(cell ^ np.uint64(13)), rows, sub))
    np.testing.assert_array_equal(block.rows, rows[order])
    np.testing.assert_array_equal(block.cols, cols[order])
    np.testing.assert_array_equal(block.vals, vals[order].astype(np.float32))
    np.testing.assert_array_equal(block.offsets, np.flatnonzero(np.diff(sub[order], prepend=-1, append=-1)))


def test_a_pass_returns_the_objective_it_starts_from():
    """With no step the factors stay put, so the pass's running sums are the objective of those factors."""
    rng = np.random.default_rng(2)
    rows, cols, vals = _random_block(rng, 20, 30, 150)
    block = K.RatingBlock(rows.astype(np.int32), cols.astype(np.int32), vals, np.array([0, len(vals)]))
    P, Q = _side(rng, np.bincount(rows, minlength=20), 3), _side(rng, np.bincount(cols, minlength=30), 3)
    P.bias[:] = rng.standard_normal(20)
    pred = 3.5 + P.bias[rows] + Q.bias[cols] + np.einsum("ij,ij->i", P.vecs[rows], Q.vecs[cols])
    err = K.sgd_block(block, np.zeros(1, np.int64), P, Q, mu=3.5, lr=0.0, biases=True, rating_range=(1.0, 5.0))
    penalty = (P.reg * (P.vecs**2).sum(1) + P.bias_reg * P.bias**2)[rows] + (Q.reg * (Q.vecs**2).sum(1) + Q.bias_reg * Q.bias**2)[cols]
    assert err.count == 150
    assert err.sse == pytest.approx(((vals - pred) ** 2).sum(), rel=1e-4)
    assert err.sse_clipped == pytest.approx(((vals - np.clip(pred, 1, 5)) ** 2).sum(), rel=1e-4)
    assert err.penalty == pytest.approx(penalty.sum(), rel=1e-4)


def test_the_kernel_compiles_where_numba_has_no_writable_cache(tmp_path):
    """A read-only package (here: __pycache__ cannot be made) and a home without a cache folder: no on-disk cache."""
    package = tmp_path / "site" / "mfdist"
    shutil.copytree(Path(K.__file__).resolve().parents[2], package, ignore=shutil.ignore_patterns("__pycache__"))
    for folder in [package, *(p for p in package.rglob("*") if p.is_dir())]:
        (folder / "__pycache__").write_text("a file where numba would make its cache folder")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".cache").write_text("not a folder")
    script = (
        "import numpy as np; from mfdist.train.dsgd import kernel as K\n"
        "b = K.layout_block(np.array([0, 1]), np.array([1, 0]), np.array([4.0, 2.0]), rank=2, seed=1)\n"
        "s = lambda: K.Side(np.full((2, 2), 0.1, np.float32), *(np.zeros(2, np.float32),) * 3, np.ones(2, np.float32))\n"
        "print(K.sgd_block(b, np.arange(b.n_sub), s(), s(), mu=3.0, lr=0.1, biases=True, rating_range=(1.0, 5.0)).count)\n"
        "print(K.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "XDG_"))}
    env.update(HOME=str(home), PYTHONPATH=str(package.parent))
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["2", str(package / "train" / "dsgd" / "kernel.py")]


def test_epoch_0_counts_each_rows_ratings_across_input_tasks_and_warm_starts_only_trained_rows():
    d, rank = 2, 3
    grid = D.grid_for(d, slots=2, users=10, items=4, user_col="u", item_col="i")
    inputs = [pa.RecordBatch.from_pydict({D.HELD: np.array(h, np.int64), D.MOVING: np.array(m, np.int64)})
              for h, m in (([0, 2, 2, 7], [1, 1, 3, 3]), ([2, 7, 9], [0, 1, 1]))]
    parts = pa.Table.from_batches([b for batch in inputs for b in tasks.row_counts(iter([batch]), d=d)])
    def part(kind: str, block: int) -> pa.Table:
        return parts.filter((pc.field("_kind") == kind) & (pc.field("_block") == block))

    held_0 = part(D.HELD, 0)
    # Held block 0 holds indices 0, 2, 4, 6, 8 (local rows 0..4). Of the warm rows, local row 1 (index 2) is
    # trained and takes its values; local row 2 (index 4) has no ratings and row 7 lies past the block.
    warm = pa.Table.from_pydict({
        "_kind": [D.HELD] * 3, "_block": [0] * 3, "_row": [1, 2, 7], "_wb": [0.5, 0.7, 0.9],
        "_wv": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]],
    }, schema=pa.schema([("_kind", pa.string()), ("_block", pa.int32()), ("_row", pa.int32()), ("_wb", pa.float32()),
                         ("_wv", pa.list_(pa.float32()))]))
    row = tasks.initial_block(held_0, warm, grid=grid, rank=rank, seed=1).to_pylist()[0]
    fb = tasks.from_row({k: base64.b64encode(v).decode() if isinstance(v, bytes) else v for k, v in row.items()}, rank=rank)
    np.testing.assert_array_equal(fb.counts, [1, 3, 0, 0, 0])  # index 0 once, index 2 three times over two tasks
    np.testing.assert_array_equal(fb.vecs[1], [1.0, 2.0, 3.0])
    assert fb.bias[1] == np.float32(0.5) and fb.bias[0] == 0 and not fb.vecs[2:].any() and fb.vecs[0].any()
    moving_1 = part(D.MOVING, 1)
    assert sorted(zip(*(np.concatenate([np.frombuffer(v, np.int32) for v in moving_1[c].to_pylist()]).tolist()
                        for c in ("_rows", "_n")))) == [(0, 2), (0, 2), (1, 2)]  # items 1 (twice per task) and 3


def test_penalty_weights():
    reg, bias_reg = K.penalty_weights(np.array([0, 1, 4, 16]), reg=0.1, bias_reg=2.0, exponent=0.5, mean_count=4.0)
    np.testing.assert_allclose(reg, [0.0, 0.2, 0.1, 0.05], rtol=1e-6)
    np.testing.assert_allclose(bias_reg, [0.0, 2.0, 0.5, 0.125], rtol=1e-6)
    flat, _ = K.penalty_weights(np.array([1, 9]), reg=0.1, bias_reg=0.0, exponent=1.0, mean_count=3.0)
    np.testing.assert_allclose(flat, [0.1, 0.1], rtol=1e-6)


# ---- schedule and Spark plan ----------------------------------------------------------------


@pytest.mark.parametrize("d, slots", [(1, 1), (2, 2), (3, 3), (5, 5), (8, 8), (3, 2), (8, 2), (8, 3)])
def test_strata_cover_every_block_once_per_epoch_and_tasks_never_share_a_row_or_column(d, slots):
    grid = D.grid_for(d, slots=slots, users=100, items=50, user_col="u", item_col="i")
    for epoch in range(1, 4):
        order = D.strata_order(42, epoch, grid.tasks)
        assert sorted(order) == list(range(grid.tasks))
        done = []
        for s in order:
            held = [list(grid.blocks_of(t, D.HELD, s)) for t in range(grid.tasks)]
            moving = [list(grid.blocks_of(t, D.MOVING, s)) for t in range(grid.tasks)]
            assert sorted(sum(held, [])) == sorted(sum(moving, [])) == list(range(d))  # each block with one task
            for t in range(grid.tasks):
                assert all(grid.task_of(D.HELD, h, s) == t for h in held[t])
                assert all(grid.task_of(D.MOVING, m, s) == t for m in moving[t])
                done += [(h, m) for h in held[t] for m in moving[t]]
                assert all(grid.stratum_of(h, m) == s for h in held[t] for m in moving[t])
        assert sorted(done) == [(h, m) for h in range(d) for m in range(d)]
    assert D.strata_order(42, 1, 8) != D.strata_order(42, 2, 8)


def _lineage(jrdd) -> tuple[set[int], list[set[int]]]:
    """Persisted RDD ids reachable from ``jrdd`` through narrow dependencies, and behind each shuffle."""
    narrow: set[int] = set()
    shuffles: list[set[int]] = []

    def walk(rdd, found: set[int], top: bool) -> None:
        if not top and rdd.getStorageLevel().useMemory():
            found.add(rdd.id())
            return
        deps = rdd.dependencies()
        for i in range(deps.size()):
            dep = deps.apply(i)
            if dep.getClass().getSimpleName() == "ShuffleDependency":
                shuffles.append(set())
                walk(dep.rdd(), shuffles[-1], False)
            else:
                walk(dep.rdd(), found, False)

    walk(jrdd.rdd(), narrow, True)
    return narrow, shuffles


def _block(kind: str, block: int) -> tasks.FactorBlock:
    return tasks.FactorBlock(kind, block, None, None, None, None, K.NO_ERRORS)


def _worker_state(_) -> tuple[str, int]:
    """The Python worker's main module and the specialisations its compiled kernel holds, before any update."""
    main = sys.modules["__main__"]
    return getattr(main.__spec__, "name", None), len(K._sgd.signatures)


def test_python_workers_fork_from_a_daemon_that_loaded_the_kernel(spark):
    # Without it the workers' main module is pyspark.daemon, and a new worker compiles (or loads) the kernel mid-epoch.
    states = spark.sparkContext.parallelize(range(4), 4).map(_worker_state).collect()
    assert all(main == "mfdist.daemon" and compiled >= 1 for main, compiled in states), states


def _daemon_pids(batches):
    yield pa.RecordBatch.from_pydict({"ppid": [os.getppid()]})


def test_rdd_tasks_and_arrow_udfs_share_one_daemon(spark):
    # Arrow UDFs add SPARK_SIMPLIFIED_TRACEBACK to the worker environment; without the same variable on RDD
    # tasks Spark starts a second daemon, which pays the imports and every worker start again.
    rdd_daemons = set(spark.sparkContext.parallelize(range(4), 4).map(lambda _: os.getppid()).collect())
    udf_daemons = {r.ppid for r in spark.range(4).repartition(4).mapInArrow(_daemon_pids, "ppid long").collect()}
    assert len(rdd_daemons) == 1 and udf_daemons == rdd_daemons, (rdd_daemons, udf_daemons)


@pytest.mark.parametrize("tasks_per_sub_epoch", [3, 2])
def test_a_sub_epoch_brings_each_task_its_blocks_by_one_shuffle_and_keeps_nothing(spark, tasks_per_sub_epoch):
    sc, d, stratum = spark.sparkContext, 3, 1
    grid = D.grid_for(d, slots=tasks_per_sub_epoch, users=9, items=6, user_col="u", item_col="i")

    def mine(t: int, kind: str) -> list[int]:
        return list(grid.blocks_of(t, kind, stratum))

    rows = [[(h, m, "ratings") for h in mine(t, D.HELD) for m in mine(t, D.MOVING)] for t in range(grid.tasks)]
    ratings = L.zippable(sc.parallelize(rows, grid.tasks)).cache()
    previous = sc.parallelize(range(d), d).flatMap(lambda b: [_block(D.HELD, b), _block(D.MOVING, (b + 1) % d)])
    out = sub_epoch(ratings, previous, stratum=stratum, grid=grid, step=lambda item: [item])
    for t, [(blocks, routed)] in enumerate(out.glom().collect()):
        assert sorted(fb.block for _, fb in routed if fb.kind == D.HELD) == mine(t, D.HELD)
        assert sorted(fb.block for _, fb in routed if fb.kind == D.MOVING) == mine(t, D.MOVING)
        assert {(h, m) for h, m, _ in blocks} == {(h, m) for h in mine(t, D.HELD) for m in mine(t, D.MOVING)}
    narrow, shuffles = _lineage(out._jrdd)
    # The cached ratings arrive through a narrow zip; the one exchange carries the factor blocks,
    # and nothing of the previous sub-epoch is persisted (a sub-epoch keeps only its shuffle output).
    assert narrow == {ratings._jrdd.rdd().id()}
    assert shuffles == [set()]


# ---- the trainer on Spark -------------------------------------------------------------------


def _config(tmp_path, run_id: str, *extra: str):
    return load_config(None, [
        "train.algorithm=dsgd", "train.rank=4", "train.epochs=2", "train.step_size=0.04", "train.reg=0.05",
        f"run.checkpoint_dir={tmp_path}/ck", f"run.run_id={run_id}",
        "input.synthetic.users=150", "input.synthetic.items=60", "input.synthetic.ratings=4000", "input.synthetic.rank=3",
        *extra,
    ])


@pytest.fixture(scope="module")
def planted(spark, tmp_path_factory):
    cfg = _config(tmp_path_factory.mktemp("planted"), "planted")
    ratings = generate_ratings(spark, cfg=cfg.input.synthetic, rating_range=cfg.input.rating_range, partitions=2)
    indexed = ratings.select(F.col(S.USER_ID).cast("int").alias(S.USER_IDX), F.col(S.ITEM_ID).cast("int").alias(S.ITEM_IDX), S.RATING)
    train, test = random_split(indexed, test_fraction=0.2, seed=1)
    return train.cache(), test.cache()


def _factors(model) -> dict[str, np.ndarray]:
    """Both sides as dense arrays ordered by index (the test data is tiny)."""
    out = {}
    for name, frame, idx in (("users", model.users, S.USER_IDX), ("items", model.items, S.ITEM_IDX)):
        pdf = frame.toPandas().sort_values(idx)
        out[name] = np.column_stack([pdf[S.BIAS].to_numpy(), np.stack(pdf[S.FACTORS].to_numpy())])
    return out


def test_bold_driver_rolls_back_a_diverging_epoch(planted, tmp_path):
    train, test = planted
    cfg = _config(tmp_path, "diverge", "train.step_size=100.0")
    records = make_trainer(cfg).fit(train, test=test).epochs
    assert [r.step_size for r in records] == [100.0, 50.0]
    assert all(not math.isfinite(r.loss) for r in records)
    state = CheckpointStore(train.sparkSession, f"{tmp_path}/ck/diverge/dsgd").read_state()
    assert (state.epoch, state.kept_epoch, state.step_size) == (2, 0, 25.0)


class Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_from_its_checkpoint_to_the_same_result(planted, tmp_path):
    train, test = planted
    whole = make_trainer(_config(tmp_path, "whole")).fit(train, test=test)

    def stop_after_epoch_1(record):
        if record.epoch == 1:
            raise Interrupted

    cfg = _config(tmp_path, "broken")
    with pytest.raises(Interrupted):
        make_trainer(cfg).fit(train, test=test, callback=stop_after_epoch_1)
    resumed = make_trainer(cfg).fit(train, test=test)
    assert [r.epoch for r in resumed.epochs] == [2]
    assert resumed.epochs[0].loss == pytest.approx(whole.epochs[-1].loss, rel=1e-9)
    for side, values in _factors(whole.model).items():
        np.testing.assert_array_equal(_factors(resumed.model)[side], values)


def test_the_per_epoch_test_rmse_is_the_evaluate_stages_on_the_sample(planted, tmp_path):
    train, test = planted
    result = make_trainer(_config(tmp_path, "sampled", "train.eval_every=2", "train.epochs=3")).fit(train, test=test)
    assert [r.test_rmse is not None for r in result.epochs] == [False, True, True]  # every 2nd epoch and the last
    exact = rating_metrics(test, result.model, rating_range=[1.0, 5.0])["rmse"]
    assert result.epochs[-1].test_rmse == pytest.approx(exact, abs=1e-6)  # the whole test set fits the sample
    small = make_trainer(_config(tmp_path, "small-sample", "train.eval_sample=50", "train.epochs=1")).fit(train, test=test)
    assert small.epochs[0].test_rmse != pytest.approx(exact, abs=1e-6)


def test_the_per_epoch_sample_is_bounded_and_near_its_limit_and_its_rmse_is_numpys(planted):
    _, test = planted
    n = test.count()
    sample = trainer_module._eval_sample(test, rows=n, limit=n // 3, seed=5)
    assert n // 3 - 4 * math.sqrt(n / 3) <= len(sample.ratings) <= n // 3
    assert len(trainer_module._eval_sample(test, rows=n, limit=n, seed=5).ratings) == n
    rng = np.random.default_rng(0)
    idx = np.unique(np.concatenate([sample.users, sample.items])).astype(np.int32)
    rows = trainer_module.Rows(idx, rng.normal(size=len(idx)).astype(np.float32), rng.normal(size=(len(idx), 4)).astype(np.float32))
    grid = D.grid_for(2, slots=2, users=int(idx.max()) + 1, items=int(idx.max()) + 1, user_col=S.USER_IDX, item_col=S.ITEM_IDX)
    got = sample.rmse(grid, {D.HELD: rows, D.MOVING: rows}, mu=3.0, rating_range=[1.0, 5.0])
    held, moving = sample.sides(grid)
    h, m = np.searchsorted(idx, held), np.searchsorted(idx, moving)
    pred = 3.0 + rows.bias[h] + rows.bias[m] + np.einsum("ij,ij->i", rows.vecs[h].astype(np.float64), rows.vecs[m])
    assert got == pytest.approx(np.sqrt(np.mean((sample.ratings - np.clip(pred, 1.0, 5.0)) ** 2)), rel=1e-6)


def test_checkpoints_go_through_hadoop_so_a_hadoop_only_scheme_works(planted, tmp_path, viewfs_dir):
    """viewfs:// (a Hadoop mount table over a local folder) is a scheme pyarrow's file systems do not know."""
    import pyarrow.fs as pafs

    with pytest.raises(Exception):
        pafs.FileSystem.from_uri(f"{VIEWFS}/ck")
    train, test = planted
    cfg = _config(tmp_path, "on-viewfs", f"run.checkpoint_dir={VIEWFS}/ck")
    result = make_trainer(cfg).fit(train, test=test)
    assert [r.epoch for r in result.epochs] == [1, 2]
    state = CheckpointStore(train.sparkSession, f"{VIEWFS}/ck/on-viewfs/dsgd").read_state()
    assert (state.epoch, state.kept_epoch) == (2, 2)
    assert (viewfs_dir / "ck" / "on-viewfs" / "dsgd" / "epoch-000002" / "_SUCCESS").is_file()
    assert result.model.users.count() > 0


def test_a_grid_larger_than_the_task_slots_runs_as_many_sub_epochs_as_tasks(planted, tmp_path, monkeypatch):
    """d = 6 on 2 task slots: an epoch is 2 sub-epochs (each task updates 9 blocks in turn), and it trains as d = 2 does."""
    import mfdist.train.dsgd.trainer as trainer

    train, test = planted
    monkeypatch.setattr(trainer, "task_slots", lambda spark: 2)
    rounds, real = [], trainer.sub_epoch

    def counted(*args, **kwargs):
        rounds.append(kwargs["stratum"])
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "sub_epoch", counted)
    rmse = {}
    for d in (2, 6):
        rounds.clear()
        fit = make_trainer(_config(tmp_path, f"d-{d}", f"train.blocks={d}")).fit(train)
        assert sorted(rounds) == [0, 0, 1, 1]  # 2 epochs of 2 strata
        rmse[d] = rating_metrics(test, fit.model, rating_range=[1.0, 5.0])["rmse"]
    assert rmse[6] == pytest.approx(rmse[2], abs=0.02)


def _best_epoch(records, *, min_delta: float):
    """The last epoch that beat the best so far by more than ``min_delta`` (Keras's rule)."""
    best = None
    for r in records:
        if r.validation_rmse is not None and (best is None or r.validation_rmse < best.validation_rmse - min_delta):
            best = r
    return best


def test_early_stopping_stops_on_the_validation_slice_and_keeps_its_best_epoch(planted, tmp_path):
    train, test = planted
    cfg = _config(
        tmp_path, "early", "train.epochs=40", "train.step_size=0.2", "train.tol=0", "train.early_stopping.enabled=true",
        "train.early_stopping.patience=2", "train.early_stopping.min_delta=0.002", "train.early_stopping.validation_fraction=0.2",
    )
    fit = make_trainer(cfg).fit(train, test=test)
    best = _best_epoch(fit.epochs, min_delta=0.002)
    assert fit.metrics["stopped_early"] == 1.0 and fit.epochs[-1].epoch == best.epoch + 2 < 40
    assert fit.metrics["final_epoch"] == best.epoch and fit.metrics["validation_rmse"] == pytest.approx(best.validation_rmse)
    # The model is the best epoch's: its RMSE on the held-out slice (rebuilt by the same hash) is that epoch's.
    _, validation = random_split(train, test_fraction=0.2, seed=cfg.run.seed + 2)
    assert rating_metrics(validation, fit.model, rating_range=[1.0, 5.0])["rmse"] == pytest.approx(best.validation_rmse, abs=1e-5)
    folders = sorted(p.name for p in (tmp_path / "ck" / "early" / "dsgd").glob("epoch-*"))
    assert f"epoch-{best.epoch:06d}" in folders and len(folders) <= 3  # the kept, the chain's base and the best epoch


def test_tune_reg_climbs_the_path_while_the_validation_rmse_improves(planted, tmp_path):
    train, test = planted
    cfg = _config(
        tmp_path, "tuned", "train.epochs=40", "train.step_size=0.2", "train.tol=0", "train.tune_reg=true", "train.reg=0.2",
        # A min_delta, as a user of tol=0 sets one: without it a stage whose step the bold driver keeps halving
        # improves by ever smaller amounts and holds the path on its first reg for all 40 epochs.
        "train.early_stopping.patience=2", "train.early_stopping.validation_fraction=0.2",
        "train.early_stopping.min_delta=0.001",
    )
    fit = make_trainer(cfg).fit(train, test=test)
    best = _best_epoch(fit.epochs, min_delta=0.001)
    assert fit.metrics["final_epoch"] == best.epoch and fit.metrics["validation_rmse"] == pytest.approx(best.validation_rmse)
    assert fit.metrics["reg"] in [pytest.approx(0.2 * m) for m in trainer_module.REG_PATH]
    assert fit.epochs[-1].epoch < 40  # the path ended on a stage that did not beat the ones before it
    _, validation = random_split(train, test_fraction=0.2, seed=cfg.run.seed + 2)
    assert rating_metrics(validation, fit.model, rating_range=[1.0, 5.0])["rmse"] == pytest.approx(best.validation_rmse, abs=1e-5)


def test_a_reg_stage_ends_on_its_own_stale_validation_and_the_path_on_a_stage_without_gain():
    t = _config(Path("/tmp"), "unit", "train.tune_reg=true", "train.reg=0.2", "train.early_stopping.patience=2").train
    start = TrainState(epoch=5, kept_epoch=5, step_size=0.1, loss=0.5, layout={}, mean_counts=[1.0, 1.0], reg=0.05,
                       best_epoch=4, best_rmse=0.9, best_reg=0.05, stale=1, stage_best=0.9, stage_stale=1,
                       recent_losses=[0.6, 0.55, 0.5])
    assert trainer_module._tune_reg(start, t) == start  # one stale epoch: the stage goes on
    moved = trainer_module._tune_reg(trainer_module._track_stage(start, 0.95, min_delta=0.0), t)
    assert (moved.reg, moved.stage_start, moved.stage_best, moved.stage_stale, moved.loss, moved.recent_losses, moved.tuned) == (
        0.1, 6, None, 0, None, [], False)
    # Still above the best of the lower regs but improving on itself: the stage goes on.
    going = trainer_module._track_stage(trainer_module._track_stage(replace(moved, epoch=7), 0.97, min_delta=0.0), 0.96, min_delta=0.0)
    assert trainer_module._tune_reg(replace(going, stale=5), t) == replace(going, stale=5)
    # A stage whose best is older than its start did not beat the lower regs: the path ends there.
    ended = trainer_module._tune_reg(replace(going, epoch=9, stage_stale=2), t)
    assert ended.tuned and ended.reg == 0.1 and ended.best_reg == 0.05
    assert trainer_module._tune_reg(replace(start, reg=0.8, stage_stale=2, best_epoch=5), t).tuned  # the highest reg is the last stage
    assert "reg 0.05" in trainer_module._why_done(ended, t)


def test_tune_reg_applies_to_dsgd_only():
    with pytest.raises(ConfigError, match="train.tune_reg"):
        load_config(None, ["train.algorithm=als", "train.tune_reg=true"])


def test_a_flat_objective_is_convergence_only_after_the_bold_driver_has_rolled_back():
    flat = TrainState(epoch=12, kept_epoch=12, step_size=0.1, loss=0.5, layout={}, mean_counts=[1.0, 1.0],
                      recent_losses=[0.5001, 0.5001, 0.5, 0.5])
    assert not trainer_module._converged(flat, 0.005)  # the step only grew so far
    assert not trainer_module._converged(replace(flat, first_rollback=10), 0.005)  # the window starts before it
    assert trainer_module._converged(replace(flat, first_rollback=9), 0.005)
    assert not trainer_module._converged(replace(flat, first_rollback=9, recent_losses=[0.52, 0.51, 0.5, 0.5]), 0.005)


def test_the_fit_stops_once_the_objective_falls_by_less_than_tol_over_three_epochs(planted, tmp_path):
    train, test = planted
    fit = make_trainer(_config(tmp_path, "tol", "train.epochs=40", "train.step_size=0.2", "train.tol=0.01")).fit(train, test=test)
    kept = []  # the kept (lowest so far) objective after each epoch
    for r in fit.epochs:
        kept.append(min(kept[-1], r.loss) if kept else r.loss)
    last = len(kept)
    first_rollback = next(r.epoch for i, r in enumerate(fit.epochs) if i and not r.loss < kept[i - 1])
    assert fit.metrics["converged"] == 1.0 and last == fit.metrics["epochs_run"] < 40
    assert kept[-4] - kept[-1] < 0.01 * kept[-4] and last - first_rollback >= 3
    # Not any earlier once the window lies after the first roll-back (kept[i] is after epoch i + 1).
    assert all(kept[i - 3] - kept[i] >= 0.01 * kept[i - 3] for i in range(max(3, first_rollback + 2), last - 1))
    assert fit.metrics["final_epoch"] == max(r.epoch for r in fit.epochs if r.loss == kept[-1])


def test_a_checkpoint_with_another_layout_is_a_config_error(planted, tmp_path):
    train, _ = planted
    make_trainer(_config(tmp_path, "same", "train.epochs=1")).fit(train)
    with pytest.raises(ConfigError, match="run.run_id same.*rank=4"):
        make_trainer(_config(tmp_path, "same", "train.rank=5")).fit(train)


def test_implicit_feedback_is_refused_with_a_pointer_to_als(tmp_path):
    with pytest.raises(ConfigError, match="train.algorithm.*als"):
        make_trainer(_config(tmp_path, "implicit", "input.implicit=true"))


def test_the_job_publishes_dsgd_factors_and_removes_its_checkpoints(spark, tmp_path, viewfs_dir):
    root = f"{VIEWFS}/{tmp_path.name}"
    cfg = _config(tmp_path, "job", f"output.root={root}/lake", f"run.checkpoint_dir={root}/ck", "output.top_n=3",
                  "output.similar_items=2", "evaluate.k=3")
    result = run(spark, cfg)
    assert result.record.status == "succeeded"
    runs = lake.read_table(spark, cfg.output.root, S.RUNS).first()
    assert runs.algorithm == "dsgd"
    users = lake.read_table(spark, cfg.output.root, S.USER_FACTORS)
    assert users.count() == result.model.users.count() > 0
    assert users.where(F.size(S.FACTORS) != 4).count() == 0
    epochs = lake.read_table(spark, cfg.output.root, S.EPOCHS).where(F.col("stage") == "train")
    assert sorted(r.epoch for r in epochs.collect()) == [1, 2]
    assert result.metrics[("evaluate", "rmse")] < 1.0
    assert (viewfs_dir / tmp_path.name / "lake" / S.USER_FACTORS / "run_id=job").is_dir()
    assert not (viewfs_dir / tmp_path.name / "ck" / "job").exists()  # run.keep_checkpoints is off


@pytest.mark.slow
def test_ml100k_u1_meets_the_accuracy_goal(spark, ml100k, tmp_path):
    """The trainer with conf/ml100k-dsgd.yaml's settings (rank 50, reg 0.15, 40 epochs, d = 2) on
    u1: the issue's goal is 0.920 (LIBMF 0.9235, ALS with the local defaults 0.9236); measured 0.919."""
    cfg = load_config(
        str(Path(__file__).resolve().parents[1] / "conf" / "ml100k-dsgd.yaml"),
        [f"run.checkpoint_dir={tmp_path}/ck", "run.run_id=ml100k-u1"],
    )

    def indexed(name: str):
        # MovieLens ids are 1..n: used as indices directly (the job's reindex stage is not under test).
        raw = read_movielens(spark, str(ml100k / name))
        return raw.select(
            (F.col("userId").cast("int") - 1).alias(S.USER_IDX), (F.col("movieId").cast("int") - 1).alias(S.ITEM_IDX),
            F.col("rating").cast("double").alias(S.RATING),
        ).cache()

    train, test = indexed("u1.base"), indexed("u1.test")
    result = make_trainer(cfg).fit(train, test=test)
    rmse = rating_metrics(test, result.model, rating_range=cfg.input.rating_range)["rmse"]
    assert rmse <= 0.920
    assert result.metrics["converged"] == 1.0 or result.epochs[-1].epoch == 40


def _pyspark_file(_) -> str:
    import pyspark

    return pyspark.__file__


def test_python_workers_import_an_installed_pyspark_from_its_package_not_its_zip(spark):
    # From the zip every forked worker compiles PySpark from source, and every task re-reads the zip's directory.
    files = spark.sparkContext.parallelize(range(2), 2).map(_pyspark_file).collect()
    assert all(".zip" not in f for f in files), files


def test_only_a_pip_installed_pyspark_s_own_zip_and_jars_leave_the_worker_path(tmp_path):
    from mfdist.daemon import installed_pyspark_path

    site = tmp_path / "site-packages"
    (site / "pyspark" / "python" / "lib").mkdir(parents=True)
    (site / "pyspark" / "jars").mkdir()
    (site / "pyspark" / "__init__.py").write_text("")
    installed = [str(site / "pyspark" / "python" / "lib" / "pyspark.zip"), str(site / "pyspark" / "jars" / "spark-core.jar"),
                 "/app", str(site)]
    assert installed_pyspark_path(installed) == [str(site), "/app"]
    # A Spark distribution's (a cluster's SPARK_HOME) is the only PySpark its workers have.
    distribution = ["/opt/spark/python/lib/pyspark.zip", "/opt/spark/jars/spark-core.jar", "/opt/spark/python/lib/py4j.zip"]
    assert installed_pyspark_path(distribution) == distribution
