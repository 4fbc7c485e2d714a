"""PySpark's Python worker daemon with the DSGD kernel loaded before it forks (``spark.python.daemon.module``).

Spark starts one daemon per executor and forks every Python worker from it, so each new
worker otherwise spends about a second initialising numba and loading the compiled kernel
from its cache, mid-epoch (the local demo forks a handful). Only numba and numpy are loaded
here: numba starts no thread, and numpy's one OpenBLAS thread is shut down and restarted across
a fork by OpenBLAS itself; pandas and pyarrow (jemalloc's background thread) are left to the
worker, as PySpark does, so a fork never copies a process whose other threads hold locks.

The daemon also imports PySpark from its installed package rather than from the copy zipped
inside it (see :func:`installed_pyspark_path`).
"""

from __future__ import annotations

import os
import sys

_BUNDLED_ZIP = os.path.join("python", "lib", "pyspark.zip")


def _pip_home(entry: str) -> str | None:
    """The pip-installed ``pyspark`` package whose own pyspark.zip or jar ``entry`` is, if it is one."""
    if entry.endswith(_BUNDLED_ZIP):
        home = entry[: -len(_BUNDLED_ZIP)].rstrip(os.sep)
    elif entry.endswith(".jar") and os.path.basename(os.path.dirname(entry)) == "jars":
        home = os.path.dirname(os.path.dirname(entry))
    else:
        return None
    return home if os.path.basename(home) == "pyspark" and os.path.isfile(os.path.join(home, "__init__.py")) else None


def installed_pyspark_path(path: list[str]) -> list[str]:
    """``path`` with a pip-installed PySpark's own pyspark.zip replaced by the folder that installed it, and its jar dropped.

    Spark puts ``$SPARK_HOME/python/lib/pyspark.zip`` and the spark-core jar first on every
    worker's path. Modules imported from a zip are compiled from source in every forked worker
    (zipimport caches no bytecode: timing the 5M layout alone, its workers spent 3.5 s
    compiling PySpark), and every task re-reads the directory of each zip on the path (60 ms for the
    jar's 6,000 entries, which hold no Python). Where ``$SPARK_HOME`` is a pip install the zip
    is that same release, so the package's compiled files serve it; a Spark distribution's
    zip and jar (a cluster's) stay.
    """
    kept = []
    for entry in path:
        home = _pip_home(entry)
        if home is None:
            kept.append(entry)
        elif entry.endswith(_BUNDLED_ZIP):
            kept.append(os.path.dirname(home))
    return list(dict.fromkeys(kept))


if __name__ == "__main__":
    sys.path[:] = installed_pyspark_path(sys.path)  # before PySpark's first import
    from pyspark import daemon

    from mfdist.train.dsgd.kernel import warm_up

    warm_up()
    daemon.manager()
