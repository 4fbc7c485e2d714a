"""train.warm_start: DSGD starts from a published run's factors (new ids cold), and gets to the cold run's RMSE sooner."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pyspark.sql import functions as F

from mfdist import lake
from mfdist import schema as S
from mfdist.config import SyntheticConfig, load_config
from mfdist.errors import ConfigError
from mfdist.pipeline import run
from mfdist.synth import generate_ratings
from mfdist.train.dsgd import tasks

OLD_USERS, OLD_ITEMS = 360, 90  # the base run sees ids below these; the next run all 400 x 100


@pytest.fixture(scope="module")
def nightly(spark, tmp_path_factory):
    """Planted ratings as files: a fixed test set, the base run's training ratings (old ids only) and tonight's (all)."""
    folder = tmp_path_factory.mktemp("nightly")
    ratings = generate_ratings(spark, cfg=SyntheticConfig(users=400, items=100, ratings=12_000, rank=3, seed=5),
                               rating_range=[1.0, 5.0], partitions=2).drop(S.TS)
    train, test = ratings.randomSplit([0.8, 0.2], seed=3)
    old = train.where((F.col(S.USER_ID) < OLD_USERS) & (F.col(S.ITEM_ID) < OLD_ITEMS))
    for name, frame in (("test", test), ("old", old), ("all", train)):
        frame.coalesce(1).write.parquet(str(folder / name))
    return folder


def _config(folder, lake_dir, run_id: str, ratings: str, *extra: str):
    return load_config(None, [
        # train.tol=0: every run trains the epochs it is given, which the epoch counts below compare.
        "train.algorithm=dsgd", "train.rank=4", "train.blocks=2", "train.reg=0.05", "train.step_size=0.05", "train.tol=0",
        f"output.root={lake_dir}/lake", f"run.checkpoint_dir={lake_dir}/ck", f"run.run_id={run_id}",
        "input.format=parquet", f"input.path={folder / ratings}", "split.method=file", f"split.test_path={folder / 'test'}",
        "output.top_n=0", "output.similar_items=0", "evaluate.metrics=[rmse]", *extra,
    ])


@pytest.fixture(scope="module")
def base(spark, nightly, tmp_path_factory):
    """The base run (old ids, 12 epochs) under a lake of its own."""
    lake_dir = tmp_path_factory.mktemp("warm-lake")
    cfg = _config(nightly, lake_dir, "base", "old", "train.epochs=12")
    run(spark, cfg)
    return lake_dir, cfg


def _published(spark, cfg, table: str, idx_col: str) -> dict[int, np.ndarray]:
    rows = lake.read_partition(spark, cfg.output.root, table, cfg.run.run_id).select(idx_col, S.BIAS, S.FACTORS).collect()
    return {r[0]: np.array([r[1], *r[2]], np.float32) for r in rows}


def _epoch0(spark, ck: str, *, kind: str, idx_col: str, rank: int) -> dict[int, np.ndarray]:
    """Epoch 0's rows of one side of a kept DSGD checkpoint (d = 2), by index."""
    blocks = spark.read.parquet(f"{ck}/dsgd/epoch-000000").where(F.col("kind") == kind).select("block", "vecs", "bias", "counts")
    out = {}
    for batch in tasks.model_rows(iter(blocks.toArrow().to_batches()), d=2, rank=rank, idx_col=idx_col):
        table = pa.Table.from_batches([batch])
        for idx, bias, vec in zip(*(table.column(c).to_pylist() for c in (idx_col, S.BIAS, S.FACTORS))):
            out[idx] = np.array([bias, *vec], np.float32)
    return out


def test_warm_start_begins_from_the_base_runs_factors_and_trains_the_new_ids(spark, nightly, base):
    lake_dir, base_cfg = base
    cfg = _config(nightly, lake_dir, "warm", "all", "train.epochs=2", "train.warm_start=true", "run.keep_checkpoints=true")
    result = run(spark, cfg)
    assert result.metrics[("train", "warm_start_run=base")] == 1.0
    index = {r.user_id: r.user_idx for r in lake.read_partition(spark, cfg.output.root, S.USER_INDEX, "warm").collect()}
    # Users are the larger side, so the held one: epoch 0 of the warm run is the base run's rows, bit for bit.
    start = _epoch0(spark, lake.checkpoint_path(cfg.run.checkpoint_dir, "warm"), kind="held", idx_col=S.USER_IDX, rank=4)
    published = _published(spark, base_cfg, S.USER_FACTORS, S.USER_IDX)
    assert published and set(published) <= set(start)
    for idx, row in published.items():
        np.testing.assert_array_equal(start[idx], row)
    new = [index[u] for u in range(OLD_USERS, 400) if u in index]
    assert new and all(idx not in published for idx in new)
    # New ids start as a cold start does (small random factors, zero bias) and are trained.
    assert all(start[i][0] == 0.0 and 0 < np.abs(start[i][1:]).max() < 0.5 for i in new)
    trained = _published(spark, cfg, S.USER_FACTORS, S.USER_IDX)
    assert all(not np.array_equal(trained[i], start[i]) for i in new)


def test_a_warm_start_reaches_the_cold_runs_rmse_in_fewer_epochs(spark, nightly, base):
    lake_dir, _ = base
    epochs = {}
    for run_id, extra in (("cold", []), ("warm-8", ["train.warm_start=true", "train.warm_start_run=base"])):
        cfg = _config(nightly, lake_dir, run_id, "all", "train.epochs=8", *extra)
        epochs[run_id] = [e[4] for e in run(spark, cfg).epochs if e[0] == "train"]  # test_rmse per epoch
    target = epochs["cold"][-1]
    first_warm = next(i for i, rmse in enumerate(epochs["warm-8"], start=1) if rmse <= target)
    assert first_warm < len(epochs["cold"])
    assert epochs["warm-8"][0] < epochs["cold"][0]


def test_a_base_run_that_is_missing_or_of_another_rank_is_an_error_naming_the_key(spark, nightly, base):
    lake_dir, _ = base
    missing = _config(nightly, lake_dir, "w-missing", "all", "train.warm_start=true", "train.warm_start_run=nope")
    with pytest.raises(ConfigError, match="train.warm_start_run: no succeeded run nope"):
        run(spark, missing)
    other_rank = _config(nightly, lake_dir, "w-rank", "all", "train.warm_start=true", "train.rank=5")
    with pytest.raises(ConfigError, match="train.warm_start: run .* has rank 4 factors but train.rank is 5"):
        run(spark, other_rank)


def test_als_refuses_a_warm_start_with_a_pointer_to_dsgd_and_foldin():
    with pytest.raises(ConfigError, match="train.warm_start: .*dsgd.*SPARK-21386.*foldin"):
        load_config(None, ["train.algorithm=als", "train.warm_start=true"])
