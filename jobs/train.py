"""Train a matrix-factorization model and publish it: spark-submit jobs/train.py --conf conf/local.yaml."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mfdist.cli import base_parser, run_job  # noqa: E402
from mfdist.config import Config  # noqa: E402
from mfdist.pipeline import run  # noqa: E402
from mfdist.session import job_session  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return base_parser(__doc__).parse_args(argv)


def train(cfg: Config, _: argparse.Namespace) -> int:
    with job_session(cfg) as spark:
        result = run(spark, cfg)
    print(f"run {result.record.run_id} {result.record.status} -> {cfg.output.root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(parse_args(argv), train)


if __name__ == "__main__":
    sys.exit(main())
