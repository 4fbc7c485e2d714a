"""Pieces the benchmarks share: their Spark session, the resident memory of a process tree (/proc, Linux),
and running a benchmark phase in a child process while sampling that memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Callable

from pyspark.sql import SparkSession

PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (0 when it has ended)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_KB
    except (FileNotFoundError, ProcessLookupError):  # the process ended between listing and reading
        return 0


def _parents() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    out[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
    return out


def tree(root: int) -> list[int]:
    """``root`` and every process under it."""
    parents, found = _parents(), [root]
    for pid in found:
        found.extend(child for child, parent in parents.items() if parent == pid)
    return found


def run_child(argv: list[str], measure: Callable[[int], tuple[int, ...]], what: str) -> tuple[dict, tuple[float, ...]]:
    """Run ``argv`` (a phase that prints a JSON line last); that result and the peaks of ``measure(pid)`` (KiB) in GB.

    ``measure`` is sampled every 0.1 s on the child's pid while it runs; each figure's peak is kept.
    """
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    peaks: list[int] = []

    def sample() -> None:
        while child.poll() is None:
            figures = measure(child.pid)
            peaks[:] = [max(a, b) for a, b in zip(peaks, figures)] if peaks else list(figures)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = child.communicate()
    sampler.join()
    if child.returncode:
        raise SystemExit(f"{what} failed with exit code {child.returncode}")
    return json.loads(out.strip().splitlines()[-1]), tuple(kb / 2**20 for kb in peaks)


def bench_session(*, master: str, driver_memory: str, work: str, app: str) -> SparkSession:
    """A quiet local session with its scratch and checkpoints under ``work``."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = (
        SparkSession.builder.master(master).appName(app)
        .config("spark.driver.memory", driver_memory)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.local.dir", f"{work}/spark-local")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    spark.sparkContext.setCheckpointDir(f"{work}/spark-checkpoints")
    return spark
