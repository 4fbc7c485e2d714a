"""Recompute a published run's recommendations and similar items from its factors, without retraining.

python jobs/recommend.py --conf conf/local.yaml --set output.root=<root> run.run_id=<id> [output.top_n=20 ...]
The seen items are the training pairs the run kept (``_runs/<id>/train_pairs``), so nothing is
re-read or re-split; this config's output.* applies. The run's two tables are replaced; its other
tables and run record are kept.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mfdist.cli import base_parser, run_job  # noqa: E402
from mfdist.config import Config  # noqa: E402
from mfdist.recommend import republish  # noqa: E402
from mfdist.session import job_session  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return base_parser(__doc__).parse_args(argv)


def recommend(cfg: Config, _: argparse.Namespace) -> int:
    with job_session(cfg) as spark:
        result = republish(spark, cfg)
    print(f"run {cfg.run.run_id}: recommendations for {result.listed_users} users -> {cfg.output.root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(parse_args(argv), recommend)


if __name__ == "__main__":
    sys.exit(main())
