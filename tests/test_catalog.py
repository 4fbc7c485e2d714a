"""The local demo's catalog: two runs (the first in this process, unregistered; the second a job process that
registers mf.* with `--set output.database=mf`), then a fresh process sees mf.*_latest by name; the notebook runs
on the catalog and, as the demo's default has it, on the lake alone."""

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from mfdist.config import load_config
from mfdist.pipeline import run
from tests.conftest import ML100K

REPO = Path(__file__).resolve().parents[1]
SMALL = ["train.rank=4", "train.epochs=3", "train.bias_rounds=1", "spark.master=local[2]",
         "spark.conf.spark.sql.shuffle.partitions=2", "output.top_n=5", "output.similar_items=3"]


def _python(*args, timeout=300):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def demo_lake(spark, tmp_path_factory):
    """Two runs of the local demo config (MovieLens when present, for titles); the second registers the embedded catalog."""
    root = tmp_path_factory.mktemp("demo") / "lake"
    if (ML100K / "u1.test").is_file():
        # The smallest MovieLens file keeps this quick; u.item beside it gives the notebook titles.
        data = [f"input.path={ML100K}/u1.test", "input.format=movielens"]
    else:
        data = ["input.synthetic.ratings=20000", "input.synthetic.users=800", "input.synthetic.items=150"]
    overrides = [f"output.root={root}", f"run.checkpoint_dir={root}/_ck", *data, *SMALL]
    # One job process is enough to prove the catalog; the earlier run only has to be in the lake.
    first = load_config(str(REPO / "conf" / "local.yaml"), [*overrides, "output.database=null", "run.run_id=first"])
    assert run(spark, first).record.status == "succeeded"
    _python("jobs/train.py", "--conf", "conf/local.yaml", "--set", *overrides, "output.database=mf", "run.run_id=second")
    return root, overrides


def test_fresh_process_sees_the_second_run_by_name(demo_lake):
    root, overrides = demo_lake
    out = _python("-m", "mfdist.sql", "--conf", "conf/local.yaml",
                  "SELECT run_id, count(*) AS n FROM mf.user_factors_latest GROUP BY run_id",
                  "--set", f"output.root={root}", "output.database=mf", "spark.master=local[1]")
    rows = [line for line in out.splitlines() if "second" in line or "first" in line]
    assert len(rows) == 1 and "second" in rows[0]
    assert int(rows[0].strip("|").split("|")[1]) > 0


def test_without_a_database_the_same_query_reads_the_lake_as_temp_views(demo_lake):
    root, _ = demo_lake
    out = _python("-m", "mfdist.sql", "--conf", "conf/local.yaml", "SELECT run_id FROM user_factors_latest GROUP BY run_id",
                  "--set", f"output.root={root}", "spark.master=local[1]")
    assert "second" in out and "first" not in out


@pytest.mark.parametrize("database", ["mf", "null"])
def test_analyst_notebook_executes(demo_lake, database):
    root, _ = demo_lake
    nb = nbformat.read(REPO / "notebooks" / "analyst_tour.ipynb", as_version=4)
    env = {"MFDIST_SET": f"output.root={root} output.database={database} spark.master=local[2]", "MFDIST_REPO": str(REPO)}
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    finally:
        for key in env:
            os.environ.pop(key)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "second" in text and "rank" in text
