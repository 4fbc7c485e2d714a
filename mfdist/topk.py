"""The blocked top-K behind recommendations and similar items: the numpy kernel and the Arrow task bodies.

This module runs in the Python workers, so it imports numpy and pyarrow only;
:func:`mfdist.recommend.top_k_lists` builds the Spark plans around it. Queries
(``_q`` int, ``_vec`` float32 vector, ``_exclude`` ids not to return) are
matched against candidates (``_c`` int, ``_vec``) by dot product:

- queries are cut into blocks of ``Blocks.queries`` rows and candidates,
  sorted by id, into blocks of ``Blocks.candidates``; each pair of blocks (a
  tile) is one float32 BLAS product (numpy) into a reused buffer, so a task
  holds one tile of scores;
- excluded pairs are set to -inf from the exclusion lists that travel with
  each query row (the user's training items; the item itself);
- a running top-K per query row is merged across candidate blocks: a lower
  bound on the row's final K-th best score (the running K-th best, or the
  K-th best of a leading sample of the block found by ``np.partition``)
  admits only the few scores that can still enter, and only those are sorted
  with the running list (by score desc, id asc). No row is fully sorted and
  no Python code runs per row;
- **broadcast**: when the candidate vectors fit ``output.broadcast_max_mb``
  they are broadcast, and each Arrow batch of queries (``mapInArrow``) runs
  against every candidate block;
- **block join** otherwise: queries and candidates are cut into groups
  (``Blocks.join_*``, by id modulo the group count) and every query group
  meets every candidate group in a cogroup keyed by (query group, candidate
  group) (``applyInArrow``), tile by tile as above; the partial top-Ks are
  merged by a window ordered by (score desc, id asc).

Per task: one tile of scores, plus the broadcast candidates (at most
``output.broadcast_max_mb``) or the vectors of one pair of groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class Blocks:
    """Block sizes, in rows.

    A task scores one tile of ``queries`` x ``candidates`` at a time (float32;
    16 MiB by default, small enough to stay near the CPU caches between the
    product and the comparison). The block join pairs groups of
    ``join_queries`` queries with groups of ``join_candidates`` candidates: a
    task holds the vectors of one pair of groups, and each vector is shuffled
    once per group of the other side, so groups are much larger than tiles.
    """

    queries: int = 1024
    candidates: int = 4096
    join_queries: int = 65536
    join_candidates: int = 65536


# Columns of the leading sample whose K-th best bounds a row before it has K entries.
SAMPLE = 1024

NO_ID = np.iinfo(np.int32).max
# The lowest finite score: bounds never fall below it, so excluded (-inf) pairs are never admitted.
FLOOR = np.finfo(np.float32).min

# Columns of the top-K frames: queries (_q, _vec, _exclude), candidates (_c, _vec), lists (_q, rank, _c, score).
Q, C, VEC, EXCLUDE, RANK, SCORE = "_q", "_c", "_vec", "_exclude", "rank", "score"
ARROW_LIST_SCHEMA = pa.schema(
    [(Q, pa.int32(), False), (RANK, pa.int32(), False), (C, pa.int32(), False), (SCORE, pa.float32(), False)]
)


# ---------------------------------------------------------------- the numpy kernel


def _desc_key(rows: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """uint64 keys ordering (row asc, value desc): the float bits made monotonic, under the row."""
    bits = (vals + np.float32(0.0)).view(np.uint32)  # + 0.0 turns -0.0 into 0.0, so the two tie
    ascending = np.where(bits >> np.uint32(31), ~bits, bits | np.uint32(0x80000000))
    return (rows.astype(np.uint64) << np.uint64(32)) | (~ascending).astype(np.uint64)


def _lower_bounds(scores: np.ndarray, kth: np.ndarray, k: int) -> np.ndarray:
    """Per row, a score no greater than its final K-th best (K-th best of a subset <= K-th best of all)."""
    bound = np.maximum(kth, FLOOR)
    width = min(scores.shape[1], max(SAMPLE, 32 * k))
    open_rows = np.flatnonzero(kth == -np.inf)
    if width >= k and open_rows.size:
        sample = scores[:, :width] if open_rows.size == len(kth) else scores[open_rows, :width]
        sample_kth = np.partition(sample, width - k, axis=1)[:, width - k]
        bound[open_rows] = np.maximum(bound[open_rows], sample_kth)
    return bound


def _merge(
    vals: np.ndarray, ids: np.ndarray, rows: np.ndarray, cand_vals: np.ndarray, cand_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Merge candidates (rows, values, ids) into the running (b, k) lists, touching only rows with candidates.

    Candidate ids must exceed every running id and ascend within a row: then one
    stable sort by (row, score desc) also orders equal scores by id.
    """
    k = vals.shape[1]
    touched = np.flatnonzero(np.bincount(rows, minlength=len(vals)))
    local = np.searchsorted(touched, rows)
    all_rows = np.concatenate([np.repeat(np.arange(len(touched)), k), local])
    all_vals = np.concatenate([vals[touched].ravel(), cand_vals])
    all_ids = np.concatenate([ids[touched].ravel(), cand_ids])
    order = np.argsort(_desc_key(all_rows, all_vals), kind="stable")
    # Every touched row holds at least its k running entries, so its first k sorted entries exist.
    counts = np.bincount(all_rows, minlength=len(touched))
    keep = order[((np.cumsum(counts) - counts)[:, None] + np.arange(k)).ravel()]
    vals, ids = vals.copy(), ids.copy()
    vals[touched] = all_vals[keep].reshape(-1, k)
    ids[touched] = all_ids[keep].reshape(-1, k)
    return vals, ids


def _exclude(scores: np.ndarray, cand_ids: np.ndarray, ex_rows: np.ndarray, ex_ids: np.ndarray) -> None:
    """Set the scores of the excluded (row, id) pairs in this block to -inf; ``cand_ids`` sorted."""
    if not ex_ids.size or not cand_ids.size:
        return
    pos = np.minimum(np.searchsorted(cand_ids, ex_ids), len(cand_ids) - 1)
    hit = cand_ids[pos] == ex_ids
    scores[ex_rows[hit], pos[hit]] = -np.inf


def top_k(
    queries: np.ndarray,
    ex_rows: np.ndarray,
    ex_ids: np.ndarray,
    blocks: Iterable[tuple[np.ndarray, np.ndarray]],
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` (score desc, id asc) of each query row over candidate blocks (ids, vectors).

    Block ids ascend, within and across blocks (what keeps ties in id order).
    ``ex_rows``/``ex_ids`` list the excluded (query row, candidate id) pairs.
    Returns (b, k) scores and ids; a row with fewer than k candidates is padded
    with -inf and ``NO_ID``.
    """
    b = len(queries)
    vals = np.full((b, k), -np.inf, np.float32)
    ids = np.full((b, k), NO_ID, np.int32)
    buffer = mask = None
    last_id = -1
    for cand_ids, cand_vecs in blocks:
        m = len(cand_ids)
        if not m:
            continue
        if cand_ids[0] <= last_id or np.any(cand_ids[1:] <= cand_ids[:-1]):
            raise ValueError("top_k: candidate ids must ascend within and across blocks")
        last_id = cand_ids[-1]
        if buffer is None or buffer.size < b * m:
            buffer, mask = np.empty(b * m, np.float32), np.empty(b * m, np.bool_)
        scores, admitted = buffer[: b * m].reshape(b, m), mask[: b * m].reshape(b, m)
        np.matmul(queries, cand_vecs.T, out=scores)
        _exclude(scores, cand_ids, ex_rows, ex_ids)
        np.greater_equal(scores, _lower_bounds(scores, vals[:, -1], k)[:, None], out=admitted)
        flat = np.flatnonzero(admitted)
        if flat.size:
            rows, cols = np.divmod(flat, m)
            vals, ids = _merge(vals, ids, rows, scores.ravel()[flat], cand_ids[cols])
    return vals, ids


# ---------------------------------------------------------------- Arrow task bodies


def _ints(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.int32)


def _matrix(column: pa.ChunkedArray) -> np.ndarray:
    """A list<float> column of equal-length vectors as a (rows, dim) float32 array."""
    lists = column.combine_chunks()
    flat = np.asarray(lists.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    return flat.reshape(len(lists), -1) if len(lists) else flat.reshape(0, 0)


def sorted_candidates(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    ids, vecs = _ints(table.column(C)), _matrix(table.column(VEC))
    order = np.argsort(ids, kind="stable")
    return ids[order], np.ascontiguousarray(vecs[order])


def _query_lists(table: pa.Table, blocks: list[tuple[np.ndarray, np.ndarray]], k: int) -> pa.Table:
    """The top-k rows (_q, rank, _c, score) of the queries in ``table`` against ``blocks``."""
    q_ids, vecs = _ints(table.column(Q)), _matrix(table.column(VEC))
    excluded = table.column(EXCLUDE).combine_chunks()
    ex_rows = np.repeat(np.arange(len(q_ids)), _ints(excluded.value_lengths()))
    vals, ids = top_k(vecs, ex_rows, _ints(excluded.flatten()), blocks, k)
    rows, cols = np.nonzero(vals > -np.inf)
    return pa.Table.from_arrays(
        [
            pa.array(q_ids[rows], pa.int32()),
            pa.array(cols.astype(np.int32) + 1, pa.int32()),
            pa.array(ids[rows, cols], pa.int32()),
            pa.array(vals[rows, cols], pa.float32()),
        ],
        schema=ARROW_LIST_SCHEMA,
    )


def _tiled_lists(queries: pa.Table, candidates: tuple[np.ndarray, np.ndarray], k: int, blocks: Blocks) -> Iterator[pa.Table]:
    """The top-k of ``queries`` against sorted ``candidates``, one score tile (query block x candidate block) at a time."""
    ids, vecs = candidates
    step = blocks.candidates
    tiles = [(ids[s : s + step], vecs[s : s + step]) for s in range(0, len(ids), step)]
    for start in range(0, queries.num_rows, blocks.queries):
        yield _query_lists(queries.slice(start, blocks.queries), tiles, k)


def broadcast_task(candidates, k: int, blocks: Blocks) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """mapInArrow body: each Arrow batch of queries against the broadcast candidates."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            for lists in _tiled_lists(pa.Table.from_batches([batch]), candidates.value, k, blocks):
                yield from lists.to_batches()

    return run


def pair_task(k: int, blocks: Blocks) -> Callable[[pa.Table, pa.Table], pa.Table]:
    """applyInArrow body: the partial top-k of one query group against one candidate group."""

    def run(queries: pa.Table, candidates: pa.Table) -> pa.Table:
        # A group may hold no queries (its ids are sparse): concat needs at least one table.
        lists = _tiled_lists(queries, sorted_candidates(candidates), k, blocks)
        return pa.concat_tables([ARROW_LIST_SCHEMA.empty_table(), *lists])

    return run
