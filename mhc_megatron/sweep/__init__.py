"""Scaling sweeps: train a grid of models (sizes x token budgets x variants), fit loss vs compute.

``tools/scaling_sweep.py`` is the command line (its docstring: the subcommands),
``examples/scaling/README.md`` the guide. The modules, in the order a sweep uses them:

- ``grid``: the YAML grid file, validated, expanded into runs (``load_grid``, ``Grid``, ``Run``).
- ``plan``: ``plan.json``, ``runs.txt`` and the SLURM scripts.
- ``launch``: running the unfinished runs locally or submitting them to SLURM.
- ``runlog``: a run's log: its result, the settings it was launched with, its last error.
- ``params``: active parameter counts (``tools/count_params.py`` in one subprocess).
- ``results``: every run's result into ``results.csv``.
- ``fit``: the power law per variant and the gaps to the baseline.
- ``plot``: ``scaling.png``.
- ``cli``: the subcommands.

What the numbers mean:

* Final validation loss: Megatron's end-of-training evaluation on the validation set (the log line
  ``validation loss at iteration N on validation set | lm loss value: X``, ``--eval-iters``
  batches), in nats per token. Megatron prints it only once the training loop has run to
  ``--train-iters``: a run without it is unfinished (failed, stopped or still running).
* Tokens D: consumed samples at that iteration (the ``iteration N/ M | consumed samples: S``
  line, else N x global batch size) x ``seq_length`` (Megatron's argument dump in the same log).
* Parameters N: the active parameters of ``tools/count_params.py`` for the run's own model
  arguments (built on the meta device in one subprocess for the whole sweep, cached in
  ``params.json``): everything but the input embedding, the routed experts at topk/E, the output
  layer and the mHC parameters included.
* Compute C = 6 * N * D FLOPs (forward 2ND + backward 4ND). Left out: attention's
  sequence-length term (~6 * layers * seq * attention width per token), the stream mixing of
  mHC/HC that is not a parameter matmul (O(n^2 * C) per token and site), and the evaluations.
  So the variants of one size and budget get the same C up to their extra parameters (0.1% at
  the paper's sizes, ~20% in the tiny grid): the fits compare losses at matched model compute,
  and mHC's 6.7% time overhead (paper, n = 4) is not counted as compute.
"""
