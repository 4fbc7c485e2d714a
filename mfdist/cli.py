"""Shared command-line handling for the jobs: --conf/--config, --set, logging, exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from mfdist.config import Config, load_config
from mfdist.errors import ConfigError, InputError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--conf", "--config", dest="conf", required=True, help="YAML config file (conf/local.yaml)")
    parser.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="override config keys, e.g. --set train.rank=32 output.root=/tmp/lake",
    )
    return parser


def run_job(args: argparse.Namespace, body: Callable[[Config, argparse.Namespace], int]) -> int:
    """Load config, configure logging and run ``body``; map errors to exit codes (2 config/input, 1 other)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        cfg = load_config(args.conf, args.overrides)
        return body(cfg, args)
    except (ConfigError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
