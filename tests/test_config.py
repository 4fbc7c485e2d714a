import subprocess
import sys
from pathlib import Path

import pytest

from mfdist.config import TRAINER_DEFAULTS, Config, config_from_dict, load_config, parse_overrides
from mfdist.errors import ConfigError
from mfdist.session import local_worker_conf, one_worker_pool

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "conf").glob("**/*.yaml")), ids=lambda p: p.name)
def test_every_conf_file_loads(path):
    if path.parent.name in {"databricks", "emr"}:
        pytest.skip("scheduler definitions, not job configs")
    assert isinstance(load_config(path), Config)


def test_overrides_are_typed():
    cfg = load_config(REPO / "conf/local.yaml", ["train.rank=32", "input.rating_range=[0, 10]", "split.test_path=x.csv"])
    assert cfg.train.rank == 32
    assert cfg.input.rating_range == [0.0, 10.0]
    assert cfg.split.test_path == "x.csv"


def test_each_trainer_takes_its_own_section_then_the_shared_keys_then_its_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  reg: 0.2\n  als:\n    rank: 7\n  dsgd:\n    rank: 30\n    epochs: 12\n")
    als = load_config(f).train
    assert (als.rank, als.reg, als.epochs) == (7, 0.2, TRAINER_DEFAULTS["als"].epochs)
    dsgd = load_config(f, ["train.algorithm=dsgd"]).train
    assert (dsgd.rank, dsgd.reg, dsgd.epochs, dsgd.step_size) == (30, 0.2, 12, TRAINER_DEFAULTS["dsgd"].step_size)
    # A shared key given on the command line is meant for whichever trainer runs.
    assert load_config(f, ["train.rank=16"]).train.rank == 16
    assert load_config(f, ["train.algorithm=dsgd", "train.rank=16"]).train.rank == 16
    assert load_config(f, ["train.dsgd.rank=8", "train.algorithm=dsgd"]).train.rank == 8
    with pytest.raises(ConfigError, match=r"train\.dsgd\.reg: must be >= 0"):
        load_config(f, ["train.dsgd.reg=-1"])


def test_a_recorded_config_reads_back_the_same():
    cfg = load_config(REPO / "conf/local.yaml", ["train.algorithm=dsgd", "train.als.reg=0.3"])
    assert config_from_dict(cfg.to_dict()) == cfg


def test_spark_conf_keys_keep_their_dots():
    cfg = load_config(None, ["spark.conf.spark.sql.shuffle.partitions=4", "spark.conf.spark.ui.enabled=false"])
    assert cfg.spark.conf == {"spark.sql.shuffle.partitions": "4", "spark.ui.enabled": "false"}


def test_run_id_defaults_to_timestamp():
    assert load_config(None).run.run_id.endswith("Z")


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.rnak=3", "train.rnak"),
        ("train.rank=ten", "train.rank"),
        ("train.rank=0", "train.rank"),
        ("split.method=sideways", "split.method"),
        ("train.biases=maybe", "train.biases"),
        ("split.test_fraction=1.5", "split.test_fraction"),
        ("input.rating_range=[5, 1]", "input.rating_range"),
        ("evaluate.metrics=[rmse, auc]", "evaluate.metrics"),
        ("bogus=1", "bogus"),
        ("train.tol=1", "train.tol"),
        ("train.early_stopping.validation_fraction=0", "train.early_stopping.validation_fraction"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace("[", r"\[")):
        load_config(REPO / "conf/local.yaml", [override])


def test_early_stopping_with_als_names_the_key():
    with pytest.raises(ConfigError, match="train.early_stopping.enabled"):
        load_config(REPO / "conf/local.yaml", ["train.algorithm=als", "train.early_stopping.enabled=true"])


def test_unknown_key_in_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  rank: 4\n  epocs: 3\n")
    with pytest.raises(ConfigError, match="train.epocs"):
        load_config(f)


def test_override_without_equals():
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_overrides(["train.rank"])


def _job(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "jobs/train.py"), *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )


@pytest.mark.parametrize(
    "args, named",
    [
        (["--conf", "conf/local.yaml", "--set", "train.rnak=3"], "train.rnak"),
        (["--conf", "conf/local.yaml", "--set", "train.rank=abc"], "train.rank"),
        (["--config", "conf/nope.yaml"], "conf/nope.yaml"),
    ],
)
def test_job_exits_2_naming_the_problem(args, named):
    proc = _job(*args)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and named in last


def test_job_exits_2_for_missing_input_path(tmp_path):
    proc = _job(
        "--conf", "conf/local.yaml", "--set", "input.format=csv", f"input.path={tmp_path}/missing.csv",
        f"output.root={tmp_path}/lake", f"run.checkpoint_dir={tmp_path}/ck", "spark.master=local[1]", "output.database=null",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "missing.csv" in proc.stderr.strip().splitlines()[-1]


def test_only_local_masters_fork_python_workers_from_the_preloaded_daemon(monkeypatch):
    monkeypatch.delenv("PYSPARK_GATEWAY_PORT", raising=False)
    daemon = {"spark.python.daemon.module": "mfdist.daemon"}
    assert local_worker_conf(load_config(None, ["spark.master=local[2]"])) == daemon
    # Executors of a cluster get mfdist as --py-files, on a task's path but not on the daemon's.
    assert local_worker_conf(load_config(None, ["spark.master=spark://127.0.0.1:7077"])) == {}
    monkeypatch.setenv("PYSPARK_GATEWAY_PORT", "1")  # spark-submit's --master decides
    assert local_worker_conf(load_config(None, ["spark.master=local[2]"])) == {}


def test_rdd_tasks_get_the_worker_environment_of_sql_udfs_unless_their_tracebacks_are_full():
    assert one_worker_pool({}) == {"spark.executorEnv.SPARK_SIMPLIFIED_TRACEBACK": "1"}
    assert one_worker_pool({"spark.sql.execution.pyspark.udf.simplifiedTraceback.enabled": "false"}) == {}
