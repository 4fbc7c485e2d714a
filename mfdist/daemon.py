"""PySpark's Python worker daemon with the DSGD kernel loaded before it forks (``spark.python.daemon.module``).

Spark starts one daemon per executor and forks every Python worker from it, so each new
worker otherwise spends about a second initialising numba and loading the compiled kernel
from its cache, mid-epoch (the local demo forks a handful). Only numba and numpy are loaded
here: they start no threads at import, which a fork would not carry over (pandas and pyarrow
do, which is why PySpark imports them in the worker, after the fork).
"""

from pyspark import daemon

from mfdist.train.dsgd.kernel import warm_up

if __name__ == "__main__":
    warm_up()
    daemon.manager()
