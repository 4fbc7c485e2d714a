"""Fold-in (jobs/foldin.py): factors for new or changed users (or items) against a published run, without retraining.

For every user in the given ratings (a known user's whole history, or a new
user's first ratings) the job solves the user's bias and factors with the base
run's items, item biases and mu fixed, minimising the base trainer's own
objective for that one row::

    sum_i (r_ui - mu - b_i - b_u - p_u . q_i)^2 + lambda_p(n_u) |p_u|^2 + bias_reg b_u^2

with ``lambda_p(n) = reg * n`` for ALS (MLlib's ALS-WR weighting) and
``reg * mean_count**0.4 * n**0.6`` for DSGD (its per-row penalty summed over
the row's n ratings, see :func:`mfdist.train.dsgd.kernel.penalty_weights`),
a ridge regression in ``[b_u, p_u]`` solved exactly by one (rank + 1)^2 system.
The solves run in Spark tasks, one group of ratings per user
(the ratings partitioned and sorted by user, each task solving its users in turn);
nothing per user reaches the driver.

The job publishes a run of its own (run_id, ``runs`` row, every table):
``user_factors`` are the base run's with the folded users replaced or added,
the item tables are the base run's, ``recommendations`` are recomputed for the
folded users (their given ratings are the seen items) and carried over for the
rest. New user ids are appended to ``user_index`` as in training. Ratings of
items the base run has no factors for go to ``rejected_ratings``.
``foldin.side: items`` is the same with the sides swapped; there the
recommendations are carried over (new items enter users' lists at the next
training run) and ``similar_items`` are recomputed over all items.

The parts: :mod:`.solve` (the per-row solves, run in the Python workers; the package
imports nothing itself, so a worker loads only that module) and :mod:`.job` (the
Spark plan and the run it publishes).
"""
