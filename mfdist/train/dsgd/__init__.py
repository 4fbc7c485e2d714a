"""Stage 4, train (``train.algorithm: dsgd``): stratified distributed SGD (Gemulla et al., KDD 2011).

Input: indexed training ratings (user_idx int, item_idx int, rating double) and,
optionally, indexed test ratings for per-epoch test RMSE. Output: a
:class:`~mfdist.model.Model` (mu; users and items frames of idx int, bias float,
factors array<float>, rows with training ratings only) and one
:class:`~mfdist.train.EpochRecord` per epoch.

The parts:

- :mod:`.schedule`: the d x d grid and which blocks each task updates when;
- :mod:`.layout`: the rating strata, laid out once per fit and cached;
- :mod:`.kernel`: the compiled SGD pass over one block (numba);
- :mod:`.tasks`: everything that runs in the Python workers;
- :mod:`.checkpoint`: factor blocks and state per epoch, through Spark and Hadoop;
- :mod:`.trainer`: the epochs, the bold driver, evaluation, resume.

Ratings are cut into d x d blocks by (user_idx mod d, item_idx mod d), d =
``train.blocks`` or the cluster's task slots. The larger side (usually users)
is *held*: block b of it is updated by task b in every sub-epoch. The smaller
side *moves*. Sub-epoch s of an epoch processes stratum s = {(b, (b + s) mod d)}:
d blocks that share no held block and no moving block, so the d tasks update
disjoint factor rows in parallel. An epoch is d sub-epochs, with the order of
strata shuffled per epoch (seeded).

Worked example (d = 2; six users, four items, nine ratings)::

                item 0  item 1  item 2  item 3
        user 0     5       .       3       .
        user 1     .       4       .       1
        user 2     2       .       .       4
        user 3     .       .       5       .
        user 4     .       3       .       .
        user 5     1       .       .       2

  Users are the larger side, so they are held: user block 0 = users {0, 2, 4},
  user block 1 = users {1, 3, 5}; item block 0 = items {0, 2}, item block 1 =
  items {1, 3}. A block stores local rows ``user_idx // 2`` and local columns
  ``item_idx // 2`` (``RatingBlock``: rows, cols, vals as columnar arrays)::

        block (0, 0): (u0,i0)=5 (u0,i2)=3 (u2,i0)=2      stratum 0, task 0
        block (1, 1): (u1,i1)=4 (u1,i3)=1 (u5,i3)=2      stratum 0, task 1
        block (0, 1): (u2,i3)=4 (u4,i1)=3                stratum 1, task 0
        block (1, 0): (u3,i2)=5 (u5,i0)=1                stratum 1, task 1

  ``ratings[s]`` is a cached RDD of d partitions whose partition b is block
  (b, (b + s) mod d); ``ratings[0]`` = [(0,0), (1,1)], ``ratings[1]`` = [(0,1), (1,0)].
  An epoch whose shuffled strata order is [1, 0] runs:

        epoch start: the kept checkpoint's blocks are read and routed to stratum 1's tasks:
                                user block b -> task b, item block j -> task (j - 1) mod 2
        sub-epoch 0, stratum 1: task 0 updates block (0,1): user block 0, item block 1
                                task 1 updates block (1,0): user block 1, item block 0
        routed to stratum 0:    user block b -> task b, item block j -> task j
        sub-epoch 1, stratum 0: task 0 updates block (0,0): user block 0, item block 0
                                task 1 updates block (1,1): user block 1, item block 1
        epoch end: the four factor blocks are written as the epoch's checkpoint

  Every block is updated once per epoch; user block b stays with task b.

More blocks than task slots (d > T = ``Grid.tasks``): block b belongs to group
b mod T, and the T x T grid of groups is scheduled as above: an epoch is T
strata, and in stratum s task t updates, one after another, every rating block
(h, m) with h mod T = t and m mod T = (t + s) mod T, that is (d / T)^2 blocks.
So the number of sub-epochs, each a Spark stage with its shuffle, is the number
of tasks, not d; d only sets how finely the ratings and factors are cut (a
pinned ``train.blocks`` keeps its layout on a smaller cluster at the cost of a
larger cluster's speed, never of d stages per epoch).

Spark layout: a sub-epoch is ``ratings[s].zip(routed)`` mapped through the
kernel, where ``routed`` is the previous sub-epoch's output (or the kept
epoch's blocks) keyed by task and ``partitionBy(T)``: that shuffle is the only
exchange, and a sub-epoch persists nothing (the ratings and the kept epoch's
blocks are), so it keeps only what the next one needs (the shuffle files)
whatever d is. A held block's key
does not change, and Spark runs reduce task b where most of its input was
written, so on a cluster it is mostly the moving blocks that cross the network.
The whole epoch is one Spark job (the checkpoint write).

Step size: bold driver. The training objective (squared errors plus penalties,
see :mod:`.kernel`) of an epoch is summed by the kernel as it passes each
rating, so it costs no extra pass; when it fell, the epoch is kept and the step
grows 5%; when it rose or is not finite, the epoch is rolled back and the step
halved. A rolled-back epoch still counts towards ``train.epochs``. Inside an
epoch each row scales that step by its AdaGrad factor (LIBMF's rule); the
per-row sums travel and are checkpointed with the factor blocks. Test RMSE per
epoch is computed every ``train.eval_every`` epochs (and at the last) on at
most ``train.eval_sample`` test ratings; the evaluate stage scores all of them.

A run started again with the same ``run.run_id`` resumes after the last
finished epoch; every random choice is a function of (run.seed, epoch, block),
so the result equals that of an uninterrupted run, and a retried task (a lost
executor) recomputes exactly what it computed before.

The package imports nothing itself, so a Python worker that unpickles a task of
:mod:`.tasks` loads numpy, pyarrow and the kernel, not the trainer's driver side.
"""
