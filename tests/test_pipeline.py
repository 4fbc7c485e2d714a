"""End-to-end: the job on tiny data publishes every table with the contract's columns."""

import pytest
from pyspark.sql import functions as F

from mfdist import lake
from mfdist import schema as S
from mfdist.config import load_config
from mfdist.errors import InputError
from mfdist.pipeline import run
from tests.conftest import tiny_config

CONTRACT = {
    S.RUNS: ["status", "started_at", "finished_at", "algorithm", "config", "input_rows", "accepted_rows", "rejected_rows"],
    S.USER_INDEX: ["user_id", "user_idx"],
    S.ITEM_INDEX: ["item_id", "item_idx"],
    S.USER_FACTORS: ["user_id", "user_idx", "bias", "factors"],
    S.ITEM_FACTORS: ["item_id", "item_idx", "bias", "factors"],
    S.METRICS: ["stage", "metric", "value"],
    S.EPOCHS: ["stage", "epoch", "loss", "train_rmse", "test_rmse", "step_size", "seconds"],
    S.REJECTED_RATINGS: ["user_id", "item_id", "rating", "ts", "reason"],
}

@pytest.fixture(scope="module")
def first_run(tiny_run):
    return tiny_run


def test_every_table_has_the_contract_columns(spark, first_run):
    cfg, result = first_run
    assert result.record.status == "succeeded"
    for table, columns in CONTRACT.items():
        df = lake.read_table(spark, cfg.output.root, table)
        assert df is not None, table
        missing = set(columns + [S.RUN_ID]) - set(df.columns)
        assert not missing, f"{table} lacks {missing}"
        assert df.where(F.col(S.RUN_ID) == "r1").count() > 0 or table == S.REJECTED_RATINGS, table


def test_run_record_and_metrics(spark, first_run):
    cfg, result = first_run
    runs = lake.read_table(spark, cfg.output.root, S.RUNS).first()
    assert runs.status == "succeeded" and runs.algorithm == "als"
    assert runs.input_rows == runs.accepted_rows + runs.rejected_rows
    stages = {(r.stage, r.metric) for r in lake.read_table(spark, cfg.output.root, S.METRICS).collect()}
    for stage in ("ingest", "reindex", "split", "train", "evaluate", "publish"):
        assert (stage, "seconds") in stages
    assert {("evaluate", "rmse"), ("evaluate", "mae")} <= stages
    assert result.metrics[("evaluate", "rmse")] < 1.0


def test_factor_tables_cover_trained_users(spark, first_run):
    cfg, result = first_run
    uf = lake.read_table(spark, cfg.output.root, S.USER_FACTORS)
    assert uf.count() == result.model.users.count()
    assert uf.where(F.size("factors") != 4).count() == 0


def test_second_run_reuses_the_index(spark, first_run, tmp_path):
    cfg, _ = first_run
    again = tiny_config(tmp_path, "input.synthetic.ratings=7000", run_id="r2")
    again = again.__class__(**{**again.__dict__, "output": cfg.output})
    run(spark, again)
    index = lake.read_table(spark, cfg.output.root, S.USER_INDEX)
    r1 = {r.user_id: r.user_idx for r in index.where("run_id = 'r1'").collect()}
    r2 = {r.user_id: r.user_idx for r in index.where("run_id = 'r2'").collect()}
    assert all(r2[k] == v for k, v in r1.items())
    assert sorted(r2.values()) == list(range(len(r2)))


def test_unseen_test_users_are_scored_not_dropped(spark, tmp_path):
    train = tmp_path / "train.csv"
    test = tmp_path / "test.csv"
    train.write_text("user_id,item_id,rating\n" + "\n".join(f"u{u},i{i},{1 + (u * i) % 5}" for u in range(30) for i in range(12)) + "\n")
    test.write_text("user_id,item_id,rating\nu1,i1,3\nnewuser,i2,4\nu2,newitem,2\n")
    cfg = tiny_config(tmp_path, "input.format=csv", f"input.path={train}", "split.method=file", f"split.test_path={test}")
    result = run(spark, cfg)
    assert result.metrics[("evaluate", "unseen_user_rows")] == 1
    assert result.metrics[("evaluate", "unseen_item_rows")] == 1
    assert result.metrics[("split", "test_rows")] == 3


@pytest.mark.slow
def test_ml100k_u1_als_with_biases(spark, ml100k, tmp_path):
    cfg = load_config(
        "conf/local.yaml",
        [
            f"input.path={ml100k}/u1.base", "input.format=movielens", "split.method=file",
            f"split.test_path={ml100k}/u1.test", f"output.root={tmp_path}/lake", f"run.checkpoint_dir={tmp_path}/ck",
            "output.top_n=0", "output.similar_items=0", "train.algorithm=als",
        ],
    )
    result = run(spark, cfg)
    assert result.metrics[("evaluate", "rmse")] <= 0.925
    assert result.metrics[("ingest", "input_rows")] == 100_000


def test_a_run_that_fails_while_its_runs_row_is_written_is_recorded_failed(spark, tmp_path):
    # The running row is written while ingest reads; a failing ingest waits for it, then marks it failed.
    cfg = tiny_config(tmp_path, "input.format=parquet", f"input.path={tmp_path}/missing", run_id="bad")
    with pytest.raises(InputError, match="missing"):
        run(spark, cfg)
    (row,) = lake.read_table(spark, cfg.output.root, S.RUNS).collect()
    assert (row.run_id, row.status) == ("bad", "failed") and "InputError" in row.error and row.finished_at is not None
