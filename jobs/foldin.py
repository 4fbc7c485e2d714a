"""Fold new or changed users (or items) into a published run without retraining, and publish it as a new run.

python jobs/foldin.py --conf conf/local.yaml --set output.root=<root> foldin.base_run=<run id> input.path=<ratings> [foldin.side=items]
The given ratings are each folded user's whole history; everyone else keeps the base run's factors and lists.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mfdist.cli import base_parser, run_job  # noqa: E402
from mfdist.config import Config  # noqa: E402
from mfdist.foldin.job import run_foldin  # noqa: E402
from mfdist.session import job_session  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return base_parser(__doc__).parse_args(argv)


def foldin(cfg: Config, _: argparse.Namespace) -> int:
    with job_session(cfg) as spark:
        result = run_foldin(spark, cfg)
    print(
        f"run {result.record.run_id} {result.record.status}: {result.folded} {cfg.foldin.side} folded into run "
        f"{cfg.foldin.base_run} ({result.new_ids} new) -> {cfg.output.root}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(parse_args(argv), foldin)


if __name__ == "__main__":
    sys.exit(main())
