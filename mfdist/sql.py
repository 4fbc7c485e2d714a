"""Run an analyst query on the lake: python -m mfdist.sql --conf conf/local.yaml "SELECT ...".

With ``output.database`` set the catalog's tables and ``_latest`` views are used
(``mf.user_factors_latest``); otherwise every table and its ``_latest`` view is
registered as a temp view of this session (``user_factors_latest``).
"""

from __future__ import annotations

import argparse
import sys

from pyspark.sql.utils import AnalysisException

from mfdist.catalog import register_temp_views
from mfdist.cli import base_parser, run_job
from mfdist.config import Config
from mfdist.errors import InputError
from mfdist.session import job_session


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser(__doc__)
    parser.add_argument("query", help="a Spark SQL query")
    parser.add_argument("--limit", type=int, default=100, help="rows to print (default 100)")
    return parser.parse_args(argv)


def query(cfg: Config, args: argparse.Namespace) -> int:
    with job_session(cfg) as spark:
        if not cfg.output.database:
            register_temp_views(spark, cfg.output.root)
        try:
            result = spark.sql(args.query)
        except AnalysisException as exc:
            raise InputError(f"query: {str(exc).splitlines()[0]}") from None
        result.show(args.limit, truncate=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(parse_args(argv), query)


if __name__ == "__main__":
    sys.exit(main())
