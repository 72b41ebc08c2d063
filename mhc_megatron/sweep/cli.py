"""The command line of the scaling sweep (``tools/scaling_sweep.py``; its docstring: usage)."""

from __future__ import annotations

import argparse
import sys

from mhc_megatron.sweep.fit import fit
from mhc_megatron.sweep.grid import SweepError, load_grid
from mhc_megatron.sweep.launch import run_local, submit_slurm
from mhc_megatron.sweep.plan import plan
from mhc_megatron.sweep.plot import plot
from mhc_megatron.sweep.results import collect

DESCRIPTION = (
    "Scaling sweep: train a grid of models (sizes x token budgets x variants), fit loss vs compute."
)
COMMANDS = {
    "plan": "write the runs file and the SLURM scripts, print the runs",
    "run": "run the unfinished runs (--local) or submit them as a SLURM array (--slurm)",
    "collect": "read the runs' logs into results.csv",
    "fit": "power-law fit per variant (fit.csv) and gaps to the baseline (gaps.csv)",
    "plot": "scaling.png from the CSVs",
    "all": "plan, run --local, collect, fit, plot",
}


def build_parser() -> argparse.ArgumentParser:
    """The parser of the subcommands (COMMANDS), each taking the grid and ``--out``."""
    parser = argparse.ArgumentParser(
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    parsers = {}
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("grid", help="the grid YAML (examples/scaling/tiny_grid.yaml)")
        p.add_argument("--out", help="output directory (default: the grid's out_dir)")
        parsers[name] = p
    for name in ("run", "all"):
        p = parsers[name]
        p.add_argument("--jobs", type=int, default=1, help="local runs at a time (default 1)")
        p.add_argument(
            "--timeout", type=float, default=None, help="kill a local run after this many seconds"
        )
        p.add_argument(
            "--only",
            nargs="+",
            metavar="PATTERN",
            help="only the runs whose name matches (shell patterns, e.g. 's1-*')",
        )
    mode = parsers["run"].add_mutually_exclusive_group(required=True)
    mode.add_argument("--local", action="store_true", help="run here, --jobs at a time")
    mode.add_argument("--slurm", action="store_true", help="sbatch the array and collect jobs")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand.

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).

    Returns:
        the exit code: 0 done, 1 a run failed, 2 an error (printed as ``error: ...``; argparse
        exits with 2 itself on a bad command line).
    """
    opts = build_parser().parse_args(argv)
    try:
        grid = load_grid(opts.grid, opts.out)
        if opts.command == "plan":
            plan(grid)
        elif opts.command == "run" and opts.slurm:
            submit_slurm(grid)
        elif opts.command == "run":
            return 1 if run_local(grid, opts.jobs, opts.timeout, opts.only) else 0
        elif opts.command == "collect":
            collect(grid)
        elif opts.command == "fit":
            fit(grid)
        elif opts.command == "plot":
            plot(grid)
        else:  # all: the fit goes on with the runs that finished
            plan(grid)
            failed = run_local(grid, opts.jobs, opts.timeout, opts.only)
            collect(grid)
            fit(grid)
            plot(grid)
            if failed:
                print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
                return 1
    except SweepError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
