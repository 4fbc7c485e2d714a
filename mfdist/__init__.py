"""mfdist: distributed matrix factorization on Apache Spark."""

__version__ = "0.1.0"
