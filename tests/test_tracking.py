"""MLflow tracking (tracking.mlflow): a run logs to a local file store and is read back with MlflowClient."""

from __future__ import annotations

import pytest

from mfdist.errors import InputError
from mfdist.pipeline import run
from mfdist.tracking import flatten, metric_name
from tests.conftest import tiny_config

mlflow = pytest.importorskip("mlflow", reason="MLflow tracking needs mlflow-skinny (pip install 'mfdist[mlflow]')")
from mlflow.tracking import MlflowClient  # noqa: E402


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """A file-store tracking URI (MLflow 3 wants an opt-in for the file backend)."""
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # for mlflow.search_runs
    return uri


def _tracked(tmp_path, store: str, *extra: str, run_id: str):
    return tiny_config(
        tmp_path, "tracking.mlflow.enabled=true", f"tracking.mlflow.tracking_uri={store}",
        "tracking.mlflow.experiment=mfdist-tests", *extra, run_id=run_id,
    )


def test_flatten_and_metric_names():
    assert flatten({"train": {"rank": 10, "blocks": None}, "evaluate": {"metrics": ["rmse", "ndcg"]}, "spark": {"conf": {}}}) == {
        "train.rank": "10", "train.blocks": "None", "evaluate.metrics": "['rmse', 'ndcg']", "spark.conf": "{}",
    }
    assert metric_name("evaluate", "ndcg@10") == "evaluate/ndcg_at_10"
    assert metric_name("train", "epoch", "test rmse!") == "train/epoch/test rmse_"


def test_a_tracked_run_logs_params_epochs_metrics_report_and_tags(spark, tmp_path, store):
    cfg = _tracked(tmp_path, store, "train.algorithm=dsgd", run_id="tracked-1")
    result = run(spark, cfg)

    runs = mlflow.search_runs(experiment_names=["mfdist-tests"], filter_string="tags.`mfdist.run_id` = 'tracked-1'", output_format="list")
    assert len(runs) == 1
    logged = runs[0]
    assert logged.info.status == "FINISHED" and logged.info.run_name == "tracked-1"
    params = logged.data.params
    assert (params["train.algorithm"], params["train.rank"], params["run.run_id"]) == ("dsgd", "4", "tracked-1")
    assert params["output.root"] == cfg.output.root
    tags = logged.data.tags
    assert tags["mfdist.output.root"] == cfg.output.root and "user_factors" in tags["mfdist.tables"].split(",")
    metrics = logged.data.metrics
    assert metrics["evaluate/rmse"] == pytest.approx(result.metrics[("evaluate", "rmse")])
    assert metrics["evaluate/ndcg_at_4"] == pytest.approx(result.metrics[("evaluate", "ndcg@4")])
    assert metrics["train/seconds"] > 0

    client = MlflowClient(tracking_uri=store)
    history = client.get_metric_history(logged.info.run_id, "train/epoch/test_rmse")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3, 4]
    by_epoch = {row[1]: row[4] for row in result.epochs if row[0] == "train"}
    assert all(m.value == pytest.approx(by_epoch[m.step]) for m in history)
    artifacts = {f.path for f in client.list_artifacts(logged.info.run_id, "report")}
    assert {"report/metrics.json", "report/loss_curve.png", "report/report.md"} <= artifacts


def test_a_failed_run_ends_its_mlflow_run_as_failed(spark, tmp_path, store):
    cfg = _tracked(tmp_path, store, "input.format=parquet", f"input.path={tmp_path}/missing", run_id="tracked-bad")
    with pytest.raises(InputError):
        run(spark, cfg)
    (logged,) = mlflow.search_runs(experiment_names=["mfdist-tests"], output_format="list")
    assert logged.info.status == "FAILED" and "InputError" in logged.data.tags["mfdist.error"]

