#!/usr/bin/env python3
"""Scaling sweep: train a grid of models (sizes x token budgets x variants), fit loss vs compute.

One YAML file describes the grid (``examples/scaling/tiny_grid.yaml`` is a small one, its
``README.md`` the guide). Every (size, budget, variant) is one run of ``examples/recipes/run.sh``
with its own ``OUT_DIR``; its log is the record the results are read from. The code is the
package ``mhc_megatron.sweep`` (its docstring: what the numbers mean).

Subcommands (all take the grid; ``--out DIR`` overrides its ``out_dir``):

``plan``
    Writes ``plan.json`` (every run: name, size, budget, variant, arguments, log), ``runs.txt`` (one
    line per run: ``NAME<TAB>LOG<TAB>COMMAND``), ``sweep.sbatch`` (a SLURM array, task i = line
    i+1) and ``collect.sbatch`` (collect, fit and plot after the array); prints the runs.
``run --local [--jobs N]`` / ``run --slurm``
    Local: runs the runs whose log has no final validation loss yet, N at a time (resumable: a
    finished run is skipped in well under a second). SLURM: submits ``sweep.sbatch`` for those
    runs and ``collect.sbatch`` with ``--dependency=afterany`` on it.
``collect``
    Reads every run's log into ``results.csv``: final validation loss, tokens, active parameters,
    compute. Names the runs without a result and their logs.
``fit``
    Fits ``L(C) = a * C**-b`` per variant by least squares in log-log space (``numpy.polyfit``) to
    ``fit.csv`` (a, b, R^2), and the gap of every variant to the baseline at each size and budget
    to ``gaps.csv``.
``plot``
    ``scaling.png``: loss against compute (log-log) with the fitted lines, and the gaps.
``all``
    plan, run --local, collect, fit and plot.

Exit codes: 0 done, 1 a run failed (``run``, ``all``), 2 an error in the grid, the runs or the
command line (printed as ``error: ...``).

Examples:
    python tools/scaling_sweep.py all examples/scaling/tiny_grid.yaml --jobs 2
    python tools/scaling_sweep.py plan examples/scaling/tiny_grid.yaml --out /scratch/sweep
    python tools/scaling_sweep.py run grid.yaml --slurm
    python tools/scaling_sweep.py fit grid.yaml && python tools/scaling_sweep.py plot grid.yaml
"""

from mhc_megatron.sweep.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
