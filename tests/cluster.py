"""A Spark standalone cluster on 127.0.0.1 for the cluster test tier, from pyspark's bundled bin/spark-class.

One master and two workers (one core each, each with its own work directory).
The executors run a Python environment that has the third-party dependencies
but not mfdist, so the package reaches them only the way it does on a real
cluster: the zip that ``jobs/package.py`` builds, on ``--py-files``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pyspark

REPO = Path(__file__).resolve().parents[1]
SPARK_HOME = Path(pyspark.__file__).resolve().parent
EXECUTOR_CLASS = "org.apache.spark.executor.CoarseGrainedExecutorBackend"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict[str, str]:
    """The environment of every cluster process: loopback only, nothing of this checkout on a path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON")}
    env.update(SPARK_HOME=str(SPARK_HOME), SPARK_LOCAL_IP="127.0.0.1", SPARK_NO_DAEMONIZE="1")
    return env


def executor_python(folder: Path) -> Path:
    """A venv whose site-packages links every package of this interpreter's but mfdist (and its editable hook)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    site = Path(sysconfig.get_paths(vars={"base": str(folder), "platbase": str(folder)})["purelib"])
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if re.match(r"(__editable__[._])?mfdist", entry.name, re.IGNORECASE) or entry.name == "__pycache__":
            continue
        (site / entry.name).symlink_to(entry)
    python = folder / "bin" / "python"
    check = "import numba, numpy, pandas, pyarrow, pyspark\ntry:\n    import mfdist\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('mfdist is importable')"
    subprocess.run([str(python), "-c", check], check=True, cwd=folder, env=base_env())
    return python


@dataclass
class Submission:
    """A spark-submit run in the background, its output in a file."""

    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> None:
        """Block until ``pattern`` appears in the output (AssertionError if the run ends or time passes first)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if re.search(pattern, self.output()):
                return
            assert self.proc.poll() is None, f"the run ended before {pattern!r}:\n{self.output()[-3000:]}"
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.output()[-3000:]}")

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@dataclass
class StandaloneCluster:
    root: Path
    workers: int = 2
    processes: list[subprocess.Popen] = field(default_factory=list)

    def start(self) -> "StandaloneCluster":
        self.python = executor_python(self.root / "executor-env")
        self.zip = self.root / "dist" / "mfdist.zip"
        subprocess.run([sys.executable, str(REPO / "jobs" / "package.py"), "--out", str(self.zip)], check=True, capture_output=True)
        port, ui = free_port(), free_port()
        self.url = f"spark://127.0.0.1:{port}"
        self._spawn("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port), "--webui-port", str(ui))
        for i in range(self.workers):
            work = self.root / f"worker-{i}"
            work.mkdir()
            self._spawn(f"worker-{i}", "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1", "--cores", "1",
                        "--memory", "2g", "--work-dir", str(work), "--webui-port", "0", self.url, cwd=work)
        self._wait_for_workers(f"http://127.0.0.1:{ui}/json/", timeout=90)
        return self

    def _spawn(self, name: str, cls: str, *args: str, cwd: Path | None = None) -> None:
        log = open(self.root / f"{name}.log", "w")
        self.processes.append(subprocess.Popen([str(SPARK_HOME / "bin" / "spark-class"), cls, *args], stdout=log,
                                               stderr=subprocess.STDOUT, cwd=cwd or self.root, env=base_env(), start_new_session=True))

    def _wait_for_workers(self, url: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if json.load(r).get("aliveworkers") == self.workers:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the standalone cluster did not come up; see {self.root}/*.log")

    def stop(self) -> None:
        for proc in reversed(self.processes):
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def submit(self, script: Path, *args: str, cwd: Path, name: str, py_files: bool = True) -> Submission:
        """``spark-submit --master <this cluster> script args`` from ``cwd``, in the background."""
        command = [
            str(SPARK_HOME / "bin" / "spark-submit"), "--master", self.url, "--driver-memory", "2g",
            "--conf", "spark.executor.memory=1g", "--conf", f"spark.pyspark.python={self.python}",
            "--conf", f"spark.pyspark.driver.python={sys.executable}", "--conf", "spark.ui.enabled=false",
            *(["--py-files", str(self.zip)] if py_files else []), str(script), *args,
        ]
        log = cwd / f"{name}.log"
        proc = subprocess.Popen(command, cwd=cwd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=base_env(), start_new_session=True)
        return Submission(proc, log)

    def executor_pids(self) -> list[int]:
        """Process ids of the executor JVMs running now."""
        pids = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and EXECUTOR_CLASS.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
        return pids

    def kill_an_executor(self) -> int:
        """SIGKILL one executor JVM (the master then starts a new one); returns its pid."""
        pids = self.executor_pids()
        assert pids, "no executor is running"
        os.kill(pids[0], signal.SIGKILL)
        return pids[0]
