"""Delete runs older than the newest N succeeded ones (tables, files, checkpoints) and orphaned staging (dry run unless --apply)."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mfdist.cli import base_parser, run_job  # noqa: E402
from mfdist.config import Config  # noqa: E402
from mfdist.retention import apply_gc, plan_gc  # noqa: E402
from mfdist.session import job_session  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser(__doc__)
    parser.add_argument("--keep", type=int, default=3, help="succeeded runs to keep (at least 1: the latest is never deleted)")
    parser.add_argument("--apply", action="store_true", help="delete; without it, only print what would be deleted")
    return parser.parse_args(argv)


def gc(cfg: Config, args: argparse.Namespace) -> int:
    with job_session(cfg) as spark:
        plan = plan_gc(spark, cfg.output.root, keep=args.keep, checkpoint_dir=cfg.run.checkpoint_dir)
        for line in plan.describe(cfg.output.root):
            print(("" if args.apply else "[dry run] ") + line)
        if args.apply:
            apply_gc(spark, cfg.output.root, plan, database=cfg.output.database)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(parse_args(argv), gc)


if __name__ == "__main__":
    sys.exit(main())
