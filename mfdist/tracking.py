"""MLflow tracking of a training run (``tracking.mlflow``): params, per-epoch and final metrics, report, tags.

One MLflow run per mfdist run: the flattened config as params, every epoch's
train/test RMSE with the epoch as step, the final ``metrics`` rows as
``<stage>/<metric>``, the run report as artifacts, and the run id, output root
and table names as tags. A failed mfdist run ends its MLflow run as FAILED.
Everything goes through ``MlflowClient`` (``mlflow-skinny`` is enough; imported
only by runs that track), so the
tracking server is whatever ``tracking_uri`` names, or MLflow's own default
(``MLFLOW_TRACKING_URI``; on Databricks the workspace's server).
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from mfdist import schema as S
from mfdist.config import Config, MlflowConfig
from mfdist.errors import ConfigError
from mfdist.train import EpochRecord

# MLflow refuses metric and param names outside this set (ndcg@10 is not one).
_UNSAFE_NAME = re.compile(r"[^\w./\- :]")
_BATCH = 100  # MLflow's limit on params and metrics per log_batch call
_PARAM_VALUE_LIMIT = 6000


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"rank": 10}}`` -> ``{"train.rank": "10"}`` (lists and None as text)."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value)[:_PARAM_VALUE_LIMIT]
    return flat


def metric_name(*parts: str) -> str:
    """An MLflow-safe metric name: ``("evaluate", "ndcg@10")`` -> ``evaluate/ndcg_at_10``."""
    return _UNSAFE_NAME.sub("_", "/".join(parts).replace("@", "_at_"))


def _chunks(items: list, size: int = _BATCH) -> Iterable[list]:
    return (items[i : i + size] for i in range(0, len(items), size))


class MlflowRun:
    """An open MLflow run that an mfdist run logs to."""

    def __init__(self, settings: MlflowConfig, cfg: Config, tables: list[str]):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=settings.tracking_uri)
        self.run_id = self.client.create_run(
            self._experiment_id(settings.experiment),
            run_name=cfg.run.run_id,
            tags={"mfdist.run_id": cfg.run.run_id, "mfdist.output.root": cfg.output.root, "mfdist.tables": ",".join(tables)},
        ).info.run_id
        self._log_params(flatten(cfg.to_dict()))

    def _experiment_id(self, name: str | None) -> str:
        """The id of experiment ``name`` (created when missing), or of MLflow's default experiment."""
        if name is None:
            return "0"
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found else self.client.create_experiment(name)

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        for chunk in _chunks([Param(k, v) for k, v in sorted(params.items())]):
            self.client.log_batch(self.run_id, params=chunk)

    def log_epoch(self, stage: str, e: EpochRecord) -> None:
        """One epoch's figures, the epoch as step (``train/test_rmse`` ...)."""
        values = {"loss": e.loss, "train_rmse": e.train_rmse, "test_rmse": e.test_rmse, "validation_rmse": e.validation_rmse, "seconds": e.seconds}
        self._log_metrics({metric_name(stage, "epoch", k): v for k, v in values.items() if v is not None}, step=e.epoch)

    def _log_metrics(self, values: dict[str, float], *, step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for chunk in _chunks([Metric(k, float(v), now, step) for k, v in values.items()]):
            self.client.log_batch(self.run_id, metrics=chunk)

    def finish(self, metrics: list[tuple[str, str, float]], report: dict[str, bytes]) -> None:
        """The run's final metrics and report files; the MLflow run ends FINISHED."""
        self._log_metrics({metric_name(stage, metric): value for stage, metric, value in metrics})
        with tempfile.TemporaryDirectory(prefix="mfdist-report-") as folder:
            for name, data in report.items():
                (Path(folder) / name).write_bytes(data)
            self.client.log_artifacts(self.run_id, folder, artifact_path="report")
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, exc: BaseException) -> None:
        """End the MLflow run as FAILED, with the error as a tag."""
        self.client.set_tag(self.run_id, "mfdist.error", f"{type(exc).__name__}: {exc}"[:5000])
        self.client.set_terminated(self.run_id, "FAILED")


def open_run(cfg: Config) -> MlflowRun | None:
    """The MLflow run for ``cfg`` when ``tracking.mlflow.enabled``, else None."""
    settings = cfg.tracking.mlflow
    if not settings.enabled:
        return None
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError(
            "tracking.mlflow.enabled: true needs the MLflow client: pip install 'mfdist[mlflow]' (mlflow-skinny)"
        ) from None
    database = cfg.output.database
    return MlflowRun(settings, cfg, [f"{database}.{t}" if database else t for t in S.ALL_TABLES])
