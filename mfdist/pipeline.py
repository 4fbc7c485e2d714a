"""The training job: ingest -> reindex -> split -> train -> [refine] -> evaluate -> recommend -> publish.

``run(spark, cfg)`` is what ``jobs/train.py`` and the end-to-end tests call.
Each stage logs one line with its row counts and seconds and records its wall
time as the ``seconds`` metric under its own name. The ranking metrics need
the top-K lists, so the recommend stage computes them from its lists (built
once for K = max(output.top_n, evaluate.k)) and records them under ``evaluate``.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable, Iterator, TypeVar

from pyspark.sql import DataFrame, SparkSession

from mfdist import lake
from mfdist import schema as S
from mfdist.config import Config
from mfdist.evaluate import LIST_METRICS, RANKING_METRICS, ranking_report, rating_metrics, relevance_threshold
from mfdist.ingest import IngestResult, count_by_reason, ingest
from mfdist.publish import Publisher, RunRecord, epochs_frame, factor_table, metrics_frame
from mfdist.recommend import recommend
from mfdist.reindex import apply_index, build_index, check_capacity
from mfdist.report import build_report
from mfdist.session import release_cached
from mfdist.split import TEST, label, parts
from mfdist.model import Model
from mfdist.tracking import open_run
from mfdist.train import EpochRecord, make_trainer
from mfdist.train.warm import warm_start

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class RunResult:
    record: RunRecord
    model: Model
    metrics: dict[tuple[str, str], float]
    epochs: list[tuple] = field(default_factory=list)


@dataclass
class Metrics:
    """The (stage, metric, value) rows of a run: bounded by the number of stages and metrics."""

    rows: list[tuple[str, str, float]] = field(default_factory=list)

    def add(self, stage: str, metric: str, value: float) -> None:
        self.rows.append((stage, metric, float(value)))

    def as_dict(self) -> dict[tuple[str, str], float]:
        return {(s, m): v for s, m, v in self.rows}

    @contextmanager
    def timed(self, stage: str) -> Iterator[dict[str, object]]:
        """Time a stage; the body fills ``info`` with the counts to log."""
        info: dict[str, object] = {}
        started = time.perf_counter()
        log.info("%s: started", stage)
        yield info
        seconds = time.perf_counter() - started
        self.add(stage, "seconds", seconds)
        details = " ".join(f"{k}={v}" for k, v in info.items())
        log.info("%s: done in %.1f s %s", stage, seconds, details)


def with_ingest_counts(record: RunRecord, parts: list[IngestResult], metrics: Metrics, info: dict[str, object]) -> RunRecord:
    """``record`` with the rows read, accepted and rejected over ``parts``, also as ``ingest`` metrics."""
    record = replace(
        record,
        input_rows=sum(p.input_rows for p in parts),
        accepted_rows=sum(p.accepted_rows for p in parts),
        rejected_rows=sum(p.rejected_rows for p in parts),
    )
    for name in ("input_rows", "accepted_rows", "rejected_rows"):
        metrics.add("ingest", name, getattr(record, name))
    info.update(input_rows=record.input_rows, accepted=record.accepted_rows, rejected=record.rejected_rows)
    return record


def _ingest_all(spark: SparkSession, cfg: Config) -> tuple[IngestResult, IngestResult | None]:
    train = ingest(spark, cfg.input)
    test = ingest(spark, cfg.input, path=cfg.split.test_path) if cfg.split.method == "file" else None
    return train, test


def _previous_index(spark: SparkSession, cfg: Config, table: str) -> DataFrame | None:
    """The index of the newest succeeded run under output.root, reused so ids keep their index."""
    previous = lake.latest_succeeded_run(spark, cfg.output.root, exclude=cfg.run.run_id)
    return None if previous is None else lake.read_partition(spark, cfg.output.root, table, previous)


def _index(spark: SparkSession, cfg: Config, ids: DataFrame, *, id_col: str, idx_col: str, table: str) -> tuple[DataFrame, int]:
    index = build_index(ids, _previous_index(spark, cfg, table), id_col=id_col, idx_col=idx_col, table=table)
    index = index.cache()
    size = index.count()
    check_capacity(size, table)
    return index, size


def run(spark: SparkSession, cfg: Config) -> RunResult:
    """Run every stage for ``cfg`` and publish the run; on failure the run is recorded as failed."""
    checkpoints = lake.checkpoint_path(cfg.run.checkpoint_dir, cfg.run.run_id)
    # MLlib's ALS checkpoints its factor RDDs here (Spark puts them in a folder of its own below).
    spark.sparkContext.setCheckpointDir(f"{checkpoints}/spark")
    # Start from an empty cache, so repeated runs in one session (notebooks, tests) don't pile up blocks.
    release_cached(spark)
    publisher = Publisher(spark, cfg)
    # The `runs` row is the JVM's first job (~2 s of class loading on a local master), so it is
    # written while ingest reads the input, and waited for before any stage reads the lake.
    begun = _in_background(publisher.begin)
    record = None
    metrics = Metrics()
    lo_hi = cfg.input.rating_range
    tracked = None
    try:
        tracked = open_run(cfg)
        with metrics.timed("ingest") as info:
            train_in, test_in = _ingest_all(spark, cfg)
            record = with_ingest_counts(begun.result(), [train_in] + ([test_in] if test_in else []), metrics, info)
            rejected = train_in.rejected if test_in is None else train_in.rejected.unionByName(test_in.rejected)

        with metrics.timed("reindex") as info:
            everything = train_in.ratings if test_in is None else train_in.ratings.unionByName(test_in.ratings)
            user_index, n_users = _index(spark, cfg, everything, id_col=S.USER_ID, idx_col=S.USER_IDX, table=S.USER_INDEX)
            item_index, n_items = _index(spark, cfg, everything, id_col=S.ITEM_ID, idx_col=S.ITEM_IDX, table=S.ITEM_INDEX)
            info.update(users=n_users, items=n_items)
        metrics.add("reindex", "users", n_users)
        metrics.add("reindex", "items", n_items)

        with metrics.timed("split") as info:
            # What every later stage reads: the timestamp only decides a temporal split.
            cols = [S.USER_IDX, S.ITEM_IDX, S.RATING]
            indexed = apply_index(train_in.ratings, user_index, item_index).select(*cols, S.TS)
            if test_in is None:
                # One cached frame for both parts: the joins above run once.
                labeled = label(indexed, method=cfg.split.method, test_fraction=cfg.split.test_fraction, seed=cfg.run.seed)
                labeled = labeled.select(*cols, TEST).cache()
                sizes = dict(labeled.groupBy(TEST).count().collect())
                n_train, n_test = sizes.get(False, 0), sizes.get(True, 0)
                train, test = parts(labeled)
            else:
                train, test = indexed.select(*cols).cache(), apply_index(test_in.ratings, user_index, item_index).select(*cols).cache()
                n_train, n_test = train.count(), test.count()
            # Every later stage reads the split; the ingested frames' caches have done their part.
            train_in.release()
            if test_in is not None:
                test_in.release()
            info.update(train=n_train, test=n_test)
        metrics.add("split", "train_rows", n_train)
        metrics.add("split", "test_rows", n_test)

        epochs: list[tuple] = []

        def record_epoch(stage: str, e: EpochRecord) -> None:
            epochs.extend(_epoch_rows(stage, e))
            if tracked:
                tracked.log_epoch(stage, e)

        def on_epoch(e: EpochRecord) -> None:
            record_epoch("train", e)
            log.info(
                "train epoch %d: loss=%s train_rmse=%s test_rmse=%s%s step=%s %.1f s (%.0f ratings/s)",
                e.epoch, _fmt(e.loss), _fmt(e.train_rmse), _fmt(e.test_rmse),
                "" if e.validation_rmse is None else f" validation_rmse={e.validation_rmse:.4f}", _fmt(e.step_size), e.seconds,
                n_train / e.seconds if e.seconds else 0.0,
            )

        with metrics.timed("train") as info:
            warm = warm_start(spark, cfg, user_index, item_index) if cfg.train.warm_start else None
            if warm:
                # metrics.value is a number, so the base run's id is in the metric's name.
                metrics.add("train", f"warm_start_run={warm.run_id}", 1.0)
                info.update(warm_start_run=warm.run_id)
            fit = make_trainer(cfg, warm=warm).fit(train, test=test, callback=on_epoch)
            model = fit.model
            info.update(algorithm=cfg.train.algorithm, rank=model.rank, mu=round(model.mu, 4), **fit.metrics)
        for name, value in fit.metrics.items():
            metrics.add("train", name, value)
        # jobs/recommend.py rescores a published run with it.
        metrics.add("train", "mu", model.mu)

        refined = None
        if cfg.refine.enabled:
            # Imported here so torch loads only when the stage runs.
            from mfdist.refine import plan_block, refine

            with metrics.timed("refine") as info:
                # Refined with the reg the factors were fitted with (train.tune_reg's choice).
                fitted = replace(cfg, train=replace(cfg.train, reg=fit.metrics.get("reg", cfg.train.reg)))
                refined = refine(plan_block(train, fitted), model, fitted, callback=partial(record_epoch, "refine"))
                model = refined.model
                for name, value in refined.metrics.items():
                    metrics.add("refine", name, value)
                info.update(device=refined.device, **{k: round(v, 4) for k, v in refined.metrics.items()})

        with metrics.timed("evaluate") as info:
            scores = rating_metrics(test, model, rating_range=lo_hi)
            for name in ("rmse", "mae", "unseen_user_rows", "unseen_item_rows"):
                metrics.add("evaluate", name, scores[name])
            info.update(rmse=round(scores["rmse"], 4), mae=round(scores["mae"], 4))
        print(f"test RMSE {scores['rmse']:.4f}  MAE {scores['mae']:.4f}  ({int(scores['test_rows'])} test ratings)")

        with metrics.timed("recommend") as info:
            ev, out = cfg.evaluate, cfg.output
            k_eval = ev.k if set(ev.metrics) & set(RANKING_METRICS + LIST_METRICS) else 0
            recs = recommend(spark, model, train, user_index, item_index, output=out, k=max(out.top_n, k_eval))
            # The two tables are written while the ranking metrics are computed from the same cached
            # lists: small jobs side by side (the demo's stage: 8.4 -> 7.3 s).
            with ThreadPoolExecutor(max_workers=1) as pool:
                written = pool.submit(publisher.write_all, {S.RECOMMENDATIONS: recs.recommendations, S.SIMILAR_ITEMS: recs.similar_items})
                info.update(users_listed=recs.listed_users, top_n=out.top_n, similar_items=out.similar_items)
                if k_eval:
                    threshold = relevance_threshold(ev.relevance_threshold, rating_range=lo_hi, implicit=cfg.input.implicit)
                    ranking = ranking_report(
                        recs.lists, test, k=k_eval, names=ev.metrics, threshold=threshold,
                        n_items=recs.items, n_users=recs.eligible_users,
                    )
                    for name, value in ranking.items():
                        metrics.add("evaluate", name, value)
                    info.update({name: round(value, 4) for name, value in ranking.items()})
                written.result()

        with metrics.timed("publish") as info:
            publisher.write_train_pairs(train)
            publisher.write_all({
                S.USER_INDEX: user_index,
                S.ITEM_INDEX: item_index,
                S.USER_FACTORS: factor_table(model.users, user_index, idx_col=S.USER_IDX, refined=refined.users if refined else None),
                S.ITEM_FACTORS: factor_table(model.items, item_index, idx_col=S.ITEM_IDX, refined=refined.items if refined else None),
                S.REJECTED_RATINGS: rejected,
                S.EPOCHS: epochs_frame(spark, epochs),
            })
            info.update(root=cfg.output.root, run_id=cfg.run.run_id)
        # The publish time is known only now, so the metrics table is written last.
        publisher.write(S.METRICS, metrics_frame(spark, metrics.rows))
        report = build_report(record, metrics.rows, epochs, count_by_reason(rejected, total=record.rejected_rows))
        publisher.write_report(report)
        record = publisher.commit(record)
    except BaseException as exc:
        publisher.fail(record or begun.result(), exc)
        if tracked:
            tracked.fail(exc)
        raise
    if tracked:
        tracked.finish(metrics.rows, report)
    if not cfg.run.keep_checkpoints:
        lake.FileSystem(spark, checkpoints).delete(checkpoints)
    return RunResult(record=record, model=model, metrics=metrics.as_dict(), epochs=epochs)


def _in_background(task: Callable[[], T]) -> Future[T]:
    """``task`` started on a thread of its own."""
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(task)
    finally:
        pool.shutdown(wait=False)


def _epoch_rows(stage: str, e: EpochRecord) -> list[tuple]:
    """Rows of the ``epochs`` table (without run_id): the epoch's, and with early stopping a ``validation``
    row whose test_rmse is the held-out slice's RMSE."""
    rows = [(stage, e.epoch, e.loss, e.train_rmse, e.test_rmse, e.step_size, e.seconds)]
    if e.validation_rmse is not None:
        rows.append(("validation", e.epoch, None, None, e.validation_rmse, None, None))
    return rows


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
