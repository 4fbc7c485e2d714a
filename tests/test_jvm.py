import os
import subprocess
import sys
from pathlib import Path

import pytest

from mfdist import jvm

REPO = Path(__file__).resolve().parents[1]

# A job's session in a process of its own; the JVM logs where each class came from.
JOB = """
import sys
from mfdist.config import load_config
from mfdist.session import job_session
cfg = load_config(None, ["spark.master=local[1]", "output.database=null", f"output.root={sys.argv[1]}/lake",
                         f"spark.conf.spark.driver.extraJavaOptions=-Xlog:class+load=info:file={sys.argv[2]}"])
with job_session(cfg) as spark:
    spark.range(100).write.parquet(f"{sys.argv[1]}/out")
"""


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "mfdist"


def test_the_first_local_job_dumps_the_archive_and_the_next_maps_spark_from_it(tmp_path, cache):
    def job(name: str) -> str:
        log = tmp_path / f"{name}-classes.log"
        proc = subprocess.run([sys.executable, "-c", JOB, str(tmp_path / name), str(log)], capture_output=True, text=True,
                              timeout=300, cwd=REPO, env=os.environ)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return next(line for line in log.read_text().splitlines() if "org.apache.spark.SparkContext " in line)

    assert "shared objects file" not in job("first")
    archives = list(cache.iterdir())
    assert len(archives) == 1 and archives[0].suffix == ".jsa", archives  # renamed into place, no temporary left
    assert "shared objects file (top)" in job("second")


def test_an_archive_is_dumped_only_by_a_job_and_only_when_there_is_none(cache):
    assert jvm.plan_archive({}, dump=False) is None
    dump = jvm.plan_archive({}, dump=True)
    assert dump.dumping.parent == cache and dump.dumping.name.endswith(".tmp")
    assert dump.java_options()[0] == f"-XX:ArchiveClassesAtExit={dump.dumping}"
    dump.dumping.write_bytes(b"dumped")
    jvm.finish_dump(dump, jvm_exited=True)
    assert dump.path.read_bytes() == b"dumped" and not dump.dumping.exists()
    assert jvm.plan_archive({}, dump=True) == jvm.Archive(dump.path)
    # Another class path is another archive.
    assert jvm.plan_archive({"spark.driver.extraClassPath": "/opt/extra.jar"}, dump=False) is None


def test_a_dump_whose_jvm_did_not_exit_cleanly_is_dropped(cache):
    dump = jvm.plan_archive({}, dump=True)
    dump.dumping.write_bytes(b"half")  # a partly written archive would crash the JVM that maps it
    jvm.finish_dump(dump, jvm_exited=False)
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize("options", ["-Xshare:off", "-XX:SharedArchiveFile=/opt/mine.jsa"])
def test_the_users_own_class_sharing_options_win(cache, options):
    assert jvm.plan_archive({jvm.JAVA_OPTIONS: options}, dump=True) is None


def test_archive_options_come_before_the_users_own(cache):
    archive = jvm.Archive(cache / "a.jsa")
    conf = jvm.with_archive({jvm.JAVA_OPTIONS: "-XX:+UseParallelGC", "spark.driver.memory": "4g"}, archive)
    assert conf == {jvm.JAVA_OPTIONS: f"-XX:SharedArchiveFile={cache / 'a.jsa'} -XX:+UseParallelGC", "spark.driver.memory": "4g"}


def test_without_a_writable_cache_a_job_runs_without_an_archive(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    assert jvm.plan_archive({}, dump=True) is None
