"""PySpark's Python worker daemon with the DSGD kernel loaded before it forks (``spark.python.daemon.module``).

Spark starts one daemon per executor and forks every Python worker from it, so each new
worker otherwise spends about a second initialising numba and loading the compiled kernel
from its cache, mid-epoch (the local demo forks a handful). Only numba and numpy are loaded
here: numba starts no thread, and numpy's one OpenBLAS thread is shut down and restarted across
a fork by OpenBLAS itself; pandas and pyarrow (jemalloc's background thread) are left to the
worker, as PySpark does, so a fork never copies a process whose other threads hold locks.
"""

from pyspark import daemon

from mfdist.train.dsgd.kernel import warm_up

if __name__ == "__main__":
    warm_up()
    daemon.manager()
