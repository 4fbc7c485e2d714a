"""The scheduled-job definitions parse, carry their required fields, and reference files that exist."""

import json
from pathlib import Path

import yaml

from mfdist.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_databricks_bundle_runs_train_with_prod_conf():
    bundle_dir = REPO / "conf" / "databricks"
    bundle = yaml.safe_load((bundle_dir / "databricks.yml").read_text())
    assert bundle["bundle"]["name"] == "mfdist"
    assert bundle["artifacts"]["mfdist_wheel"]["type"] == "whl"
    assert (bundle_dir / bundle["artifacts"]["mfdist_wheel"]["path"] / "pyproject.toml").is_file()
    for path in bundle["sync"]["paths"]:
        assert (bundle_dir / path).is_dir(), path
    job = bundle["resources"]["jobs"]["mfdist_train"]
    clusters = {c["job_cluster_key"] for c in job["job_clusters"]}
    tasks = {t["task_key"]: t for t in job["tasks"]}
    assert "train" in tasks and job["schedule"]["quartz_cron_expression"]
    for task in tasks.values():
        assert task["job_cluster_key"] in clusters
        assert (bundle_dir / task["spark_python_task"]["python_file"]).is_file()
        params = task["spark_python_task"]["parameters"]
        conf = bundle_dir / params[params.index("--conf") + 1]
        assert conf.is_file()
        load_config(conf)
        assert any(lib["whl"].endswith(".whl") for lib in task["libraries"])


def test_emr_steps_submit_the_jobs_with_the_package_zip():
    steps = json.loads((REPO / "conf" / "emr" / "step.json").read_text())
    assert steps and all({"Name", "Type", "ActionOnFailure", "Args"} <= set(s) for s in steps)
    for step in steps:
        args = step["Args"]
        assert step["Type"] == "Spark"
        # PySpark puts .zip files from --py-files on the executors' path, never wheels.
        assert args[args.index("--py-files") + 1].endswith(".zip")
        script = next(a for a in args if a.endswith(".py"))
        assert (REPO / "jobs" / Path(script).name).is_file()
        conf_name = args[args.index("--conf", args.index(script)) + 1]
        assert (REPO / "conf" / conf_name).is_file()
    upload = (REPO / "conf" / "emr" / "upload.sh").read_text()
    for local in ("jobs/train.py", "jobs/gc.py", "jobs/package.py", "conf/prod.yaml", "conf/emr/bootstrap.sh"):
        assert local in upload and (REPO / local).is_file()
