"""Benchmark of the refine stage: does it make the published model better, never worse? Block and full test RMSE, epochs/s.

    python bench/refine.py [--datasets ml100k synthetic] [--undertrained-epochs 2] [--set key=value ...]

Per dataset the trainer (``conf/local.yaml`` settings, or as ``--set`` says) is
fitted on every training rating, as the job does, twice: converged (its
configured epochs) and under-trained (``--undertrained-epochs``); that model is
the run with refine off. Each start is refined with a ``top_active`` and a
``random`` block on the CPU (and ``top_active`` on CUDA when torch sees a GPU).
Printed per variant: the block's validation RMSE from the start (the trainer's
solve of the block without its validation ratings) to the refined block (the
acceptance gate), whether it was merged (after a refit with the validation
ratings), the test split's RMSE on the block's (user, item) pairs before/after,
the whole test RMSE with refine off and on (the test split is held out from
training and refinement), and refinement epochs/s. The gate diagnostic then
refines the converged top_active block without early stopping and prints the
validation RMSE next to the held-out test-in-block RMSE per epoch, and the same
two figures for the MLP head (``refine.head: mlp``) on that block. ml-100k uses
u1.base/u1.test and is skipped when ../shared/data/ml-100k is absent.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyspark.sql import DataFrame, SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from mfdist import schema as S  # noqa: E402
from mfdist.config import Config, load_config  # noqa: E402
from mfdist.evaluate import rating_metrics  # noqa: E402
from mfdist.ingest import ingest  # noqa: E402
from mfdist import refine as R  # noqa: E402
from mfdist.refine import refine  # noqa: E402
from mfdist.reindex import apply_index, build_index  # noqa: E402
from mfdist.session import build_session  # noqa: E402
from mfdist.split import split  # noqa: E402
from mfdist.model import Model  # noqa: E402
from mfdist.train import make_trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ML100K = (REPO / ".." / "shared" / "data" / "ml-100k").resolve()
DATASETS = {
    # ml-100k has 943 users and 1,682 items: a 300 x 600 top_active block holds about half of its ratings.
    "ml100k": [
        "input.format=movielens", f"input.path={ML100K / 'u1.base'}", "split.method=file",
        f"split.test_path={ML100K / 'u1.test'}", "refine.sample.users=300", "refine.sample.items=600",
    ],
    "synthetic": [],
}


def prepare(spark: SparkSession, cfg: Config) -> tuple[DataFrame, DataFrame]:
    """Indexed train and test splits, as the pipeline builds them."""
    train_in = ingest(spark, cfg.input)
    test_in = ingest(spark, cfg.input, path=cfg.split.test_path) if cfg.split.method == "file" else None
    everything = train_in.ratings if test_in is None else train_in.ratings.unionByName(test_in.ratings)
    users = build_index(everything, None, id_col=S.USER_ID, idx_col=S.USER_IDX, table=S.USER_INDEX).cache()
    items = build_index(everything, None, id_col=S.ITEM_ID, idx_col=S.ITEM_IDX, table=S.ITEM_INDEX).cache()
    cols = [S.USER_IDX, S.ITEM_IDX, S.RATING]
    indexed = apply_index(train_in.ratings, users, items).select(*cols)
    if test_in is None:
        train, test = split(indexed, method=cfg.split.method, test_fraction=cfg.split.test_fraction, seed=cfg.run.seed)
    else:
        train, test = indexed, apply_index(test_in.ratings, users, items).select(*cols)
    return train.cache(), test.cache()


def in_block(test: DataFrame, users: DataFrame, items: DataFrame) -> DataFrame:
    """The test ratings of a block's (user, item) pairs: held out from training and refinement."""
    return test.join(F.broadcast(users), S.USER_IDX).join(F.broadcast(items), S.ITEM_IDX)


def variant(cfg: Config, *, strategy: str, **refine_keys: object) -> Config:
    sample = dataclasses.replace(cfg.refine.sample, strategy=strategy)
    return dataclasses.replace(cfg, refine=dataclasses.replace(cfg.refine, sample=sample, **refine_keys))


def bench_start(test: DataFrame, plan: R.BlockPlan, model: Model, cfg: Config, label: str, *, off_rmse: float) -> None:
    """One row: refine ``plan``'s block of ``model`` with ``cfg``; the block's test RMSE before/after, the whole
    test RMSE of the same run with refine off (``off_rmse``) and on."""
    lo_hi = cfg.input.rating_range
    started = time.perf_counter()
    result = refine(plan, model, cfg)
    seconds = time.perf_counter() - started
    m = result.metrics
    block_test = in_block(test, plan.users, plan.items).cache()
    tb_before = rating_metrics(block_test, model, rating_range=lo_hi)["rmse"]
    tb_after = rating_metrics(block_test, result.model, rating_range=lo_hi)["rmse"]
    all_after = rating_metrics(test, result.model, rating_range=lo_hi)["rmse"]
    epoch_s = sum(e.seconds for e in result.epochs)
    variant_name = f"{cfg.refine.sample.strategy} {cfg.refine.device}"
    print(f"{label:<14} {variant_name:<16} {int(m['users']):>5} x {int(m['items']):<5} {int(m['ratings']):>8,} "
          f"{m['rmse_before']:>7.4f}->{m['rmse_after']:.4f} {'yes' if m['accepted'] else 'no':>6} "
          f"{tb_before:>7.4f}->{tb_after:.4f} {off_rmse:>7.4f}->{all_after:.4f} {'ok' if all_after <= off_rmse else 'WORSE':>5} "
          f"{len(result.epochs):>6} {len(result.epochs) / epoch_s:>8.1f} {seconds:>6.1f}")
    block_test.unpersist()


def gate_diagnostic(test: DataFrame, plan: R.BlockPlan, model: Model, cfg: Config, *, epochs: int) -> None:
    """Validation RMSE (the acceptance gate) next to the held-out test RMSE of the block, epoch by epoch, no early stop."""
    r = cfg.refine
    # From the gate's start, the trainer's solve of the block without its validation ratings, as the stage does.
    start = R.resolve(plan.fit_ratings(with_validation=False), plan, model, cfg)
    block = R.gather_block(R.block_ratings(plan, max_ratings=r.sample.max_ratings), plan, start)
    data = R.block_tensors(block, torch.device("cpu"))
    pairs = in_block(test, plan.users, plan.items).toPandas()
    test_rows = torch.from_numpy(np.searchsorted(block.users.idx, pairs[S.USER_IDX].to_numpy()))
    test_cols = torch.from_numpy(np.searchsorted(block.items.idx, pairs[S.ITEM_IDX].to_numpy()))
    test_y = torch.from_numpy(pairs[S.RATING].to_numpy(np.float32))
    dot = R.DotModel(model.mu, block, train_biases=cfg.train.biases)

    def held_out() -> float:
        with torch.no_grad():
            return R.clipped_rmse(dot(test_rows, test_cols), test_y, cfg.input.rating_range)

    with torch.no_grad():
        gate = R.clipped_rmse(dot(data.rows[data.val], data.cols[data.val]), data.y[data.val], cfg.input.rating_range)
    trace = [(0, gate, held_out())]
    R.refine_dot(dot, data, dataclasses.replace(cfg, refine=dataclasses.replace(r, epochs=epochs, patience=epochs + 1)),
                 callback=lambda e: trace.append((e.epoch, e.test_rmse, held_out())))
    step = max(1, epochs // 8)
    print(f"gate diagnostic ({r.sample.strategy}, lr {r.lr}, no early stop): epoch validation(gate)/held-out test-in-block")
    print("  " + "  ".join(f"{e}: {v:.4f}/{t:.4f}" for e, v, t in trace if e % step == 0 or e == epochs))

    # The MLP head on the unrefined block, scored the same two ways.
    dot = R.DotModel(model.mu, block, train_biases=cfg.train.biases)
    head, outcome = R.fit_head(dot, data, cfg)
    with torch.no_grad():
        p, q = dot.user_factors.index_select(0, test_rows), dot.item_factors.index_select(0, test_cols)
        with_head = R.clipped_rmse(dot(test_rows, test_cols) + head(p, q), test_y, cfg.input.rating_range)
    print(f"mlp head: validation {outcome.rmse_before:.4f}->{outcome.rmse_after:.4f} (best epoch {outcome.best_epoch}), "
          f"held-out test-in-block {trace[0][2]:.4f}->{with_head:.4f}")


def bench_dataset(spark: SparkSession, name: str, cfg: Config, *, undertrained_epochs: int, diagnostic_epochs: int) -> None:
    train, test = prepare(spark, cfg)
    print(f"\n== {name}: {train.count():,} train / {test.count():,} test ratings, {cfg.train.algorithm} rank {cfg.train.rank}")
    print(f"{'start':<14} {'variant':<16} {'block':>13} {'ratings':>8} {'validation RMSE':>16} {'merged':>6} "
          f"{'test-in-block RMSE':>18} {'full test off->on':>17} {'':>5} {'epochs':>6} {'epochs/s':>8} {'s':>6}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    converged = None
    for epochs in (cfg.train.epochs, undertrained_epochs):
        start_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs))
        model = make_trainer(start_cfg).fit(train).model
        off_rmse = rating_metrics(test, model, rating_range=cfg.input.rating_range)["rmse"]
        for strategy in ("top_active", "random"):
            plan = R.plan_block(train, variant(start_cfg, strategy=strategy))
            if converged is None:
                converged = plan, model
            for device in devices if strategy == "top_active" else ["cpu"]:
                run_cfg = variant(start_cfg, strategy=strategy, device=device)
                bench_start(test, plan, model, run_cfg, f"{epochs} epochs", off_rmse=off_rmse)
    plan, model = converged
    gate_diagnostic(test, plan, model, variant(cfg, strategy="top_active", device="cpu"), epochs=diagnostic_epochs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=["ml100k", "synthetic"])
    parser.add_argument("--undertrained-epochs", type=int, default=2, help="the trainer's epochs for the under-trained start")
    parser.add_argument("--diagnostic-epochs", type=int, default=40)
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    with tempfile.TemporaryDirectory() as tmp:
        common = [f"output.root={tmp}/lake", f"run.checkpoint_dir={tmp}/ck", "refine.enabled=true"]
        cfgs = {d: load_config(REPO / "conf" / "local.yaml", common + DATASETS[d] + args.overrides) for d in args.datasets}
        spark = build_session(next(iter(cfgs.values())))
        spark.sparkContext.setCheckpointDir(f"{tmp}/ck")
        print(f"refine benchmark: {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} torch threads")
        try:
            for name, cfg in cfgs.items():
                if name == "ml100k" and not (ML100K / "u1.base").is_file():
                    print(f"\n== ml100k: skipped, {ML100K} not found")
                    continue
                bench_dataset(spark, name, cfg, undertrained_epochs=args.undertrained_epochs, diagnostic_epochs=args.diagnostic_epochs)
            if not torch.cuda.is_available():
                print("\nCUDA: no GPU available to torch here (torch.cuda.is_available() is false); CUDA figures not measured")
        finally:
            spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
