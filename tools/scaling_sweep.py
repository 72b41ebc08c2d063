#!/usr/bin/env python3
"""Scaling sweep: train a grid of models (sizes x token budgets x variants), fit loss vs compute.

One YAML file describes the grid (``examples/scaling/tiny_grid.yaml`` is a small one, its
``README.md`` the guide). Every (size, budget, variant) is one run of ``examples/recipes/run.sh``
with its own ``OUT_DIR``; its log is the record the results are read from.

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

Power law without an irreducible term: with a few points per variant the three-parameter
``E + a * C**-b`` is ill-determined (E and b trade off), while a line in log-log space is plain
linear least squares. The price: extrapolated far beyond the fitted compute, the pure power law
falls faster than a loss with a floor would.

Examples:
    python tools/scaling_sweep.py all examples/scaling/tiny_grid.yaml --jobs 2
    python tools/scaling_sweep.py plan examples/scaling/tiny_grid.yaml --out /scratch/sweep
    python tools/scaling_sweep.py run grid.yaml --slurm
    python tools/scaling_sweep.py fit grid.yaml && python tools/scaling_sweep.py plot grid.yaml
"""

from __future__ import annotations

import argparse
import csv
import difflib
import fnmatch
import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

from mhc_megatron.processes import free_port, kill_tree, wait_or_kill

ROOT = Path(__file__).resolve().parents[1]
RUN_SH = ROOT / "examples" / "recipes" / "run.sh"
RECIPES = ROOT / "examples" / "recipes"
VARIANTS = ("mhc", "mhc-lite", "hc", "residual")
# The grid file's keys: what each holds (for error messages).
KEYS = {
    "recipe": "the recipe of every size (examples/recipes/<recipe>.sh), e.g. tiny",
    "sizes": "a mapping of size names to pretrain_mhc.py arguments (or {recipe:, args:})",
    "budgets": "a mapping of budget names to arguments, e.g. {short: [--train-iters, 20]}",
    "variants": "a list of variants: mhc, mhc-lite, hc, residual",
    "baseline": "the variant the others are compared with (default residual when listed)",
    "args": "arguments for every run, before the size's and the budget's",
    "env": "environment for run.sh (DATA_PATH, NPROC_PER_NODE, TP, EP, ...)",
    "cpu": "true to train on CPU (run.sh's CPU=1)",
    "out_dir": "where the runs and results go (relative to the repository root)",
    "slurm": "sbatch options of the array job, e.g. {time: '04:00:00', gpus-per-node: 8}",
}
REQUIRED = ("sizes", "budgets", "variants")
NAME_RE = re.compile(r"^[A-Za-z0-9_.]+$")  # no '-': it joins size, budget and variant
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Set by the sweep for each run (what to use instead); taking them from the grid would break the
# layout.
SWEEP_ENV = {
    "VARIANT": "list the variants under 'variants'",
    "OUT_DIR": "set out_dir; each run gets OUT_DIR/runs/SIZE-BUDGET-VARIANT",
    "CPU": "set cpu: true",
    "MASTER_PORT": "each local run gets a free port, each array task its own",
}
SWEEP_ARGS = {
    "--mhc-variant": "list the variants under 'variants'",
    "--tensorboard-dir": "the sweep keeps each run's TensorBoard events in its run directory",
}

# Megatron-Core 0.19.2's log lines (megatron/training/training.py).
FINAL_MARKER = " on validation set | lm loss value: "  # also grepped by sweep.sbatch
FINAL_RE = re.compile(
    r"validation loss at iteration (\d+) on validation set \| lm loss value: (\S+) \|"
)
ITERATION_RE = re.compile(r"iteration\s+(\d+)/\s*\d+ \| consumed samples:\s+(\d+) \|")
ARG_DUMP_RE = re.compile(r"^  (\w+) \.{3,} (.*)$", re.MULTILINE)  # "  seq_length ...... 128"
# Each launch writes its command line into the log: a later plan with other settings for the
# same run directory is caught instead of silently reusing (or resuming) the old run.
COMMAND_HEADER = "# scaling_sweep command: "
COMMAND_RE = re.compile("^" + re.escape(COMMAND_HEADER) + "(.*)$", re.MULTILINE)
ERROR_RE = re.compile(r"(Error|error:|Traceback|Killed|exitcode)")
# Counting parameters with one rank of everything: the grid's parallel sizes are for training.
ONE_RANK_ARGS = [
    "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
    "--expert-model-parallel-size", "1", "--context-parallel-size", "1",
]  # fmt: skip
COUNT_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from count_params import build_meta_model, count_parameters, recipe_args
out = []
for recipe, variant, args in json.load(sys.stdin):
    model, margs = build_meta_model(recipe_args(recipe, variant) + args + sys.argv[2:])
    out.append(count_parameters(model, margs.moe_router_topk, margs.num_experts)["active"])
    del model
print("ACTIVE " + json.dumps(out))
"""
RESULT_FIELDS = (
    "name", "size", "budget", "variant", "recipe", "status", "iterations", "samples",
    "seq_length", "tokens", "active_params", "compute_flops", "final_val_loss", "log",
)  # fmt: skip
FIT_FIELDS = ("variant", "a", "b", "r2", "points", "compute_min", "compute_max", "left_out")
GAP_FIELDS = (
    "size", "budget", "variant", "baseline", "compute_flops", "loss", "baseline_loss", "gap",
    "rel_gap", "baseline_compute_ratio",
)  # fmt: skip


class SweepError(Exception):
    """A problem with the grid or the runs; the message says what to change."""


# --------------------------------------------------------------------------------------------
# The grid


@dataclass(frozen=True)
class Run:
    """One training run of the grid.

    Attributes:
        args: pretrain_mhc.py arguments after the recipe's: the grid's common args, then the
            size's, then the budget's (later ones override).
        env: run.sh's environment for this run (the grid's env, VARIANT, OUT_DIR, CPU).
    """

    index: int
    name: str
    size: str
    budget: str
    variant: str
    recipe: str
    args: tuple[str, ...]
    env: dict[str, str]
    run_dir: str
    log: str

    def command(self) -> list[str]:
        """The command line of the run, the same locally and in a SLURM array task."""
        return [
            "env",
            *(f"{k}={v}" for k, v in self.env.items()),
            str(RUN_SH),
            self.recipe,
            *self.args,
        ]


@dataclass
class Grid:
    """A parsed and validated grid file."""

    path: Path
    out_dir: Path
    variants: list[str]
    baseline: str | None
    sizes: dict[str, tuple[str, list[str]]]  # name -> (recipe, args)
    budgets: dict[str, list[str]]
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cpu: bool = False
    slurm: dict[str, str] = field(default_factory=dict)

    def runs(self) -> list[Run]:
        """Every (size, budget, variant), in that nesting order (the array task order)."""
        runs = []
        for size, (recipe, size_args) in self.sizes.items():
            for budget, budget_args in self.budgets.items():
                for variant in self.variants:
                    name = f"{size}-{budget}-{variant}"
                    run_dir = self.out_dir / "runs" / name
                    env = {**self.env, "VARIANT": variant, "OUT_DIR": str(run_dir)}
                    if self.cpu:
                        env["CPU"] = "1"
                    runs.append(
                        Run(
                            index=len(runs),
                            name=name,
                            size=size,
                            budget=budget,
                            variant=variant,
                            recipe=recipe,
                            args=(*self.args, *size_args, *budget_args),
                            env=env,
                            run_dir=str(run_dir),
                            log=str(run_dir / "train.log"),
                        )
                    )
        return runs


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (it keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise SweepError(
                    f"line {key_node.start_mark.line + 1}: key {key!r} is given twice in one "
                    f"mapping (first on line {seen[key]}): give each entry a different name"
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _known_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.sh") if p.stem not in ("common", "run"))


def _check_recipe(recipe: object, where: str) -> str:
    if not isinstance(recipe, str) or recipe not in _known_recipes():
        raise SweepError(
            f"{where}: no recipe {recipe!r} in examples/recipes; use one of "
            f"{', '.join(_known_recipes())}"
        )
    return recipe


def _arg_list(value: object, where: str) -> list[str]:
    """pretrain_mhc.py arguments from a YAML list of scalars or one shell-quoted string."""
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    if not isinstance(value, list):
        raise SweepError(
            f"{where} must be a list of arguments, e.g. [--num-layers, 2], or one string; "
            f"got {type(value).__name__}"
        )
    out = []
    for i, item in enumerate(value):
        # bool is an int too, and YAML reads yes/no/true as bools: a flag must be a string.
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise SweepError(
                f"{where}[{i}] = {item!r} is not a string or a number: quote it "
                f"(e.g. '--sequence-parallel', \"([0]*1+[1]*3)\")"
            )
        out.append(str(item))
    for flag, why in SWEEP_ARGS.items():
        if flag in out:
            raise SweepError(f"{where}: remove {flag}: {why}")
    return out


def _last_value(args: list[str], flag: str) -> str | None:
    """The value the last ``flag VALUE`` / ``flag=VALUE`` in ``args`` gives, as argparse sees it."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _name_mapping(raw: dict, key: str) -> dict:
    if not isinstance(raw.get(key), dict):
        raise SweepError(f"'{key}' must be {KEYS[key]}; got {type(raw.get(key)).__name__}")
    if not raw[key]:
        hint = (
            "budgets: {default: []} trains for the recipe's own --train-iters"
            if (key == "budgets")
            else "sizes: {s1: [--num-layers, 2, --hidden-size, 32]}"
        )
        raise SweepError(f"'{key}' is empty: the grid needs at least one, e.g. {hint}")
    for name in raw[key]:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise SweepError(
                f"{key}: name {name!r} may hold only letters, digits, '_' and '.' (it becomes "
                f"part of the run names SIZE-BUDGET-VARIANT): rename it"
            )
    return raw[key]


def load_grid(path: str | Path, out_dir: str | Path | None = None) -> Grid:
    """Reads and validates a grid file.

    Args:
        path: the YAML file.
        out_dir: overrides the file's ``out_dir`` (relative to the current directory).

    Raises:
        SweepError: naming the key at fault and what to change.
    """
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except OSError as error:
        raise SweepError(f"cannot read the grid file: {error}") from None
    except yaml.YAMLError as error:
        raise SweepError(f"{path} is not valid YAML: {error}") from None
    except SweepError as error:
        raise SweepError(f"{path}: {error}") from None
    try:
        return _parse_grid(raw, path, out_dir)
    except SweepError as error:
        raise SweepError(f"{path}: {error}") from None


def _parse_grid(raw: object, path: Path, out_dir: str | Path | None) -> Grid:
    if not isinstance(raw, dict):
        raise SweepError(f"the grid must be a mapping with keys {', '.join(KEYS)}")
    for key in raw:
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise SweepError(
                f"unknown key {key!r}{hint}; the keys are: "
                + "; ".join(f"{k}: {v}" for k, v in KEYS.items())
            )
    for key in REQUIRED:
        if key not in raw:
            raise SweepError(f"missing key '{key}': add {KEYS[key]}")

    variants = raw["variants"]
    if isinstance(variants, str):
        variants = [variants]
    if not isinstance(variants, list) or not variants:
        raise SweepError("'variants' must be a non-empty list, e.g. [residual, mhc]")
    for i, variant in enumerate(variants):
        if variant not in VARIANTS:
            raise SweepError(
                f"variants[{i}] = {variant!r} is not a variant; use {', '.join(VARIANTS)}"
            )
        if variant in variants[:i]:
            raise SweepError(f"variant {variant!r} is listed twice in 'variants': remove one")
    baseline = raw.get("baseline", "residual" if "residual" in variants else None)
    if baseline is not None and baseline not in variants:
        raise SweepError(
            f"baseline {baseline!r} is not among the variants {variants}: add it to 'variants' "
            f"or choose one of them"
        )

    default_recipe = raw.get("recipe")
    if default_recipe is not None:
        default_recipe = _check_recipe(default_recipe, "recipe")
    sizes = {}
    for name, value in _name_mapping(raw, "sizes").items():
        recipe, args = default_recipe, value
        if isinstance(value, dict):
            unknown = set(value) - {"recipe", "args"}
            if unknown:
                raise SweepError(
                    f"sizes.{name}: unknown key(s) {sorted(unknown)}; a size is a list of "
                    f"arguments or a mapping with 'recipe' and 'args'"
                )
            recipe = _check_recipe(value.get("recipe", default_recipe), f"sizes.{name}.recipe")
            args = value.get("args")
        if recipe is None:
            raise SweepError(
                f"sizes.{name}: no recipe: add a top-level 'recipe: tiny' (or 3b, 9b, 27b), or "
                f"give this size one as {{recipe: 3b, args: [...]}}"
            )
        sizes[name] = (recipe, _arg_list(args, f"sizes.{name}"))
    budgets = {
        name: _arg_list(value, f"budgets.{name}")
        for name, value in _name_mapping(raw, "budgets").items()
    }
    common = _arg_list(raw.get("args"), "args")
    for size, (_, size_args) in sizes.items():
        for budget, budget_args in budgets.items():
            eval_iters = _last_value([*common, *size_args, *budget_args], "--eval-iters")
            if eval_iters is not None and eval_iters.strip() == "0":
                raise SweepError(
                    f"size {size}, budget {budget}: --eval-iters 0 leaves no final validation "
                    f"loss to fit: remove it or give a positive number"
                )

    env = raw.get("env") or {}
    if not isinstance(env, dict):
        raise SweepError(f"'env' must be {KEYS['env']}, e.g. {{NPROC_PER_NODE: 1}}")
    for key, value in env.items():
        if not isinstance(key, str) or not ENV_NAME_RE.match(key):
            raise SweepError(f"env: {key!r} is not an environment variable name")
        if key in SWEEP_ENV:
            raise SweepError(
                f"env.{key} is set by the sweep for each run: remove it ({SWEEP_ENV[key]})"
            )
        if isinstance(value, dict | list) or value is None:
            raise SweepError(f"env.{key} must be a string or a number")
    cpu = raw.get("cpu", False)
    if not isinstance(cpu, bool):
        raise SweepError(f"'cpu' must be true or false, not {cpu!r}")
    slurm = raw.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise SweepError(f"'slurm' must be {KEYS['slurm']}")
    for key, value in slurm.items():
        if key in ("array", "output"):
            raise SweepError(
                f"slurm.{key}: the sweep sets --{key} itself: remove it (sbatch --array=... on "
                f"the command line still overrides it)"
            )
        if isinstance(value, dict | list) or value is None:
            raise SweepError(f"slurm.{key} must be a string or a number (--{key}=VALUE)")

    if out_dir is not None:
        out = Path(out_dir).resolve()
    else:
        out = ROOT / str(raw.get("out_dir") or f"runs/scaling-{path.stem}")
    if "\t" in str(out) or "\n" in str(out):
        raise SweepError(f"out_dir {str(out)!r} holds a tab or newline: choose another")
    return Grid(
        path=path.resolve(),
        out_dir=out,
        variants=variants,
        baseline=baseline,
        sizes=sizes,
        budgets=budgets,
        args=common,
        env={k: str(v) for k, v in env.items()},
        cpu=cpu,
        slurm={str(k): str(v) for k, v in slurm.items()},
    )


# --------------------------------------------------------------------------------------------
# plan: the runs file and the SLURM scripts


SWEEP_SBATCH = """#!/bin/bash
# Generated by tools/scaling_sweep.py plan (run it again rather than editing this) from
#   {grid}
# One array task per run of the sweep: task i runs line i+1 of runs.txt (NAME<TAB>LOG<TAB>COMMAND)
# with its output appended to LOG. A run whose log already holds its final validation loss is
# skipped, so a resubmitted array finishes only what is missing. Submit with
#   sbatch {sweep_sbatch}
#   sbatch --dependency=afterany:JOBID {collect_sbatch}
# or tools/scaling_sweep.py run GRID --slurm (both, --array restricted to the unfinished runs).
{header}
set -euo pipefail
RUNS={runs_txt_q}
: "${{SLURM_ARRAY_TASK_ID:?submit with sbatch (or set SLURM_ARRAY_TASK_ID to a run index)}}"
line="$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$RUNS")"
if [[ -z "$line" ]]; then
  echo "error: no run $SLURM_ARRAY_TASK_ID in $RUNS (runs 0-{last})" >&2
  exit 2
fi
IFS=$'\\t' read -r name log cmd <<< "$line"
MARKER={marker_q}
if grep -qF -- "$MARKER" "$log" 2>/dev/null; then
  echo "run $name: finished already, see $log"
  exit 0
fi
# Tasks of the array may share a node: one rendezvous port per task (SWEEP_MASTER_PORT overrides).
port=$((20000 + (${{SLURM_ARRAY_JOB_ID:-0}} * 97 + SLURM_ARRAY_TASK_ID) % 20000))
export MASTER_PORT="${{SWEEP_MASTER_PORT:-$port}}"
mkdir -p "$(dirname "$log")"
printf '# scaling_sweep: array task %s on %s at %s\\n%s%s\\n' "$SLURM_ARRAY_TASK_ID" \\
  "$(hostname)" "$(date -Is)" {command_header_q} "$cmd" >> "$log"
echo "run $name: log $log"
eval "$cmd" >> "$log" 2>&1
if ! grep -qF -- "$MARKER" "$log"; then
  echo "error: run $name ended without its final validation loss; see $log" >&2
  exit 1
fi
"""

COLLECT_SBATCH = """#!/bin/bash
# Generated by tools/scaling_sweep.py plan: collect, fit and plot the sweep of
#   {grid}
# once its array job has ended (submit with --dependency=afterany:ARRAY_JOB_ID).
{header}
set -euo pipefail
cd {root_q}
PY="${{PYTHON:-{python_q}}}"
"$PY" tools/scaling_sweep.py collect {grid_q} --out {out_q}
"$PY" tools/scaling_sweep.py fit {grid_q} --out {out_q}
"$PY" tools/scaling_sweep.py plot {grid_q} --out {out_q}
"""


def _sbatch_header(options: dict[str, str]) -> str:
    return "\n".join(f"#SBATCH --{k}={v}" for k, v in options.items())


def plan(grid: Grid, quiet: bool = False) -> list[Run]:
    """Writes plan.json, runs.txt, sweep.sbatch and collect.sbatch to the output directory.

    Returns:
        the runs, in array-task order.
    """
    runs = grid.runs()
    out = grid.out_dir
    (out / "slurm").mkdir(parents=True, exist_ok=True)  # sbatch does not create --output dirs
    (out / "plan.json").write_text(
        json.dumps(
            {
                "grid": str(grid.path),
                "baseline": grid.baseline,
                "variants": grid.variants,
                "runs": [asdict(run) for run in runs],
            },
            indent=1,
        )
        + "\n"
    )
    runs_txt = out / "runs.txt"
    runs_txt.write_text(
        "".join(f"{run.name}\t{run.log}\t{shlex.join(run.command())}\n" for run in runs)
    )
    job = f"sweep-{grid.path.stem}"
    array_opts = {
        "job-name": job,
        "array": f"0-{len(runs) - 1}",
        "nodes": "1",
        "ntasks": "1",
        "output": f"{out}/slurm/%x-%A_%a.out",
        **grid.slurm,
    }
    (out / "sweep.sbatch").write_text(
        SWEEP_SBATCH.format(
            grid=grid.path,
            runs_txt_q=shlex.quote(str(runs_txt)),
            sweep_sbatch=out / "sweep.sbatch",
            collect_sbatch=out / "collect.sbatch",
            header=_sbatch_header(array_opts),
            last=len(runs) - 1,
            marker_q=shlex.quote(FINAL_MARKER),
            command_header_q=shlex.quote(COMMAND_HEADER),
        )
    )
    # The collect job needs no GPU: only the options that say where a job may run.
    collect_opts = {
        "job-name": f"{job}-collect",
        "nodes": "1",
        "ntasks": "1",
        "output": f"{out}/slurm/%x-%j.out",
        **{k: v for k, v in grid.slurm.items() if k in ("partition", "account", "qos")},
    }
    (out / "collect.sbatch").write_text(
        COLLECT_SBATCH.format(
            grid=grid.path,
            header=_sbatch_header(collect_opts),
            root_q=shlex.quote(str(ROOT)),
            python_q=shlex.quote(sys.executable),
            grid_q=shlex.quote(str(grid.path)),
            out_q=shlex.quote(str(out)),
        )
    )
    for name in ("sweep.sbatch", "collect.sbatch"):
        (out / name).chmod(0o755)
    if not quiet:
        print(
            f"{len(runs)} runs ({len(grid.sizes)} sizes x {len(grid.budgets)} budgets x "
            f"{len(grid.variants)} variants) in {out}:"
        )
        for run in runs:
            print(f"  {run.index:3d}  {run.name:<32} {run.recipe} {shlex.join(run.args)}")
        print(
            f"SLURM: sbatch {out / 'sweep.sbatch'}, then collect.sbatch with "
            f"--dependency=afterany (or: run --slurm)"
        )
    return runs


# --------------------------------------------------------------------------------------------
# run


def parse_log(text: str) -> dict | None:
    """A run's result from its log, or None when it holds no final validation loss.

    Returns:
        {"iterations", "samples", "seq_length", "tokens", "final_val_loss"}; the last launch
        wins where a resumed run's log holds several.
    """
    finals = FINAL_RE.findall(text)
    if not finals:
        return None
    iteration, loss = int(finals[-1][0]), float(finals[-1][1])  # float() reads NAN too
    dump = dict(ARG_DUMP_RE.findall(text))  # a later dump (a relaunch) overrides
    try:
        seq_length = int(dump["seq_length"])
        global_batch = int(dump["global_batch_size"])
    except (KeyError, ValueError):
        raise SweepError(
            "the log has no Megatron argument dump (seq_length, global_batch_size): keep "
            "pretrain_mhc.py's output in the log"
        ) from None
    samples = {int(it): int(s) for it, s in ITERATION_RE.findall(text)}.get(iteration)
    if samples is None:  # the last iteration not logged (--log-interval not dividing it)
        if dump.get("rampup_batch_size", "None") != "None":
            raise SweepError(
                "with --rampup-batch-size the tokens come from the log line of the last "
                "iteration: make --log-interval divide --train-iters"
            )
        samples = iteration * global_batch
    return {
        "iterations": iteration,
        "samples": samples,
        "seq_length": seq_length,
        "tokens": samples * seq_length,
        "final_val_loss": loss,
    }


def _settings(command: list[str]) -> tuple[list[str], list[str]]:
    """(environment but OUT_DIR, recipe and arguments) of a run's command: what defines the run,
    wherever the output directory and the repository are."""
    at = next((i for i, a in enumerate(command) if a.endswith("/run.sh")), 0)
    return sorted(a for a in command[1:at] if not a.startswith("OUT_DIR=")), command[at + 1 :]


def _read_result(run: Run) -> dict | None:
    """The run's result from its log (None: not finished).

    Raises:
        SweepError: the log is of a run with other settings that finished or saved a checkpoint.
    """
    try:
        text = Path(run.log).read_text(errors="replace")
    except FileNotFoundError:
        return None
    try:
        result = parse_log(text)
    except SweepError as error:
        raise SweepError(f"run {run.name}: {error} ({run.log})") from None
    logged = COMMAND_RE.findall(text)
    checkpoint = Path(run.run_dir, "checkpoints", "latest_checkpointed_iteration.txt")
    # An unfinished run without a checkpoint starts afresh: a changed grid may relaunch it.
    if logged and (result is not None or checkpoint.exists()):
        then, now = _settings(shlex.split(logged[-1])), _settings(run.command())
        if then != now:
            raise SweepError(
                f"run {run.name} in {run.run_dir} was launched with other settings than the "
                f"grid now gives it:\n  then: {shlex.join(then[0] + then[1])}\n  now:  "
                f"{shlex.join(now[0] + now[1])}\ndelete {run.run_dir} to train it again, or "
                f"give the sweep another --out"
            )
    return result


def _last_error(log: str) -> str:
    """The last line of a log that looks like an error, to name a failure."""
    try:
        lines = Path(log).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "no log"
    for line in reversed(lines):
        if ERROR_RE.search(line) and "error_file" not in line:
            return line.strip()[:200]
    return lines[-1].strip()[:200] if lines else "empty log"


def _launch(
    run: Run, timeout_s: float | None, running: set, stop: threading.Event
) -> tuple[str, float]:
    """Runs one run, appending to its log.

    Args:
        running: the launched processes, for run_local to kill on Ctrl-C.
        stop: set on Ctrl-C: launch nothing more.

    Returns:
        (why it failed, "" if it finished; seconds).
    """
    if stop.is_set():
        return "not started: interrupted", 0.0
    Path(run.run_dir).mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    with open(run.log, "a") as log:
        log.write(
            f"# scaling_sweep: local launch at {time.strftime('%Y-%m-%dT%H:%M:%S')}\n"
            f"{COMMAND_HEADER}{shlex.join(run.command())}\n"
        )
        log.flush()
        # A session of its own: the whole tree can be killed (gloo ranks outlive torchrun).
        proc = subprocess.Popen(
            run.command(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        running.add(proc)
        if stop.is_set():  # Ctrl-C came while it started
            kill_tree(proc)
        try:
            rc = wait_or_kill(proc, timeout_s)  # timed out or failed: gloo ranks would spin on
        finally:
            running.discard(proc)
    seconds = time.monotonic() - start
    if rc is None:
        return f"killed after the --timeout of {timeout_s:g} s", seconds
    if stop.is_set():
        return "killed: interrupted", seconds
    if _read_result(run) is None:
        return f"exit code {rc}, no final validation loss: {_last_error(run.log)}", seconds
    return "", seconds


def _select(runs: list[Run], only: list[str] | None) -> list[Run]:
    if not only:
        return runs
    chosen = [r for r in runs if any(fnmatch.fnmatchcase(r.name, pat) for pat in only)]
    if not chosen:
        raise SweepError(
            f"--only {' '.join(only)} matches no run; the runs are "
            f"{', '.join(r.name for r in runs)}"
        )
    return chosen


def run_local(
    grid: Grid, jobs: int = 1, timeout_s: float | None = None, only: list[str] | None = None
) -> list[str]:
    """Runs the unfinished runs of the grid on this machine, ``jobs`` at a time.

    Returns:
        the names of the runs that failed (each printed with its log and last error line).
    """
    runs = _select(plan(grid, quiet=True), only)
    todo = []
    for run in runs:
        result = _read_result(run)
        if result is None:
            todo.append(run)
        else:
            print(f"skip {run.name}: finished (validation loss {result['final_val_loss']:.4f})")
    if not todo:
        print(f"all {len(runs)} runs finished")
        return []
    print(
        f"running {len(todo)} of {len(runs)} runs, {jobs} at a time; logs in "
        f"{grid.out_dir / 'runs'}/NAME/train.log"
    )

    running, stop = set(), threading.Event()

    def one(run: Run) -> tuple[Run, str]:
        failure, seconds = _launch(run, timeout_s, running, stop)
        print(
            f"{'FAILED' if failure else 'done'} {run.name} in {seconds:.0f} s"
            + (f": {failure}; log {run.log}" if failure else ""),
            flush=True,
        )
        return run, failure

    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        outcomes = list(pool.map(one, todo))
    except KeyboardInterrupt:
        # The runs sit in sessions of their own, out of reach of the terminal's Ctrl-C.
        stop.set()
        for proc in list(running):
            kill_tree(proc)
        raise SweepError(
            "interrupted: the running runs were killed; run again to go on (finished runs are "
            "kept, the others resume from their last checkpoint)"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    failed = [run for run, failure in outcomes if failure]
    if failed:
        print(f"{len(failed)} run(s) failed:", file=sys.stderr)
        for run in failed:
            print(f"  {run.name}: {run.log}", file=sys.stderr)
    return [run.name for run in failed]


def submit_slurm(grid: Grid) -> tuple[str, str] | None:
    """Submits the unfinished runs as an array job and the collect job after it.

    Returns:
        (array job id, collect job id), or None when every run has finished.
    """
    runs = plan(grid, quiet=True)
    todo = [run.index for run in runs if _read_result(run) is None]
    if not todo:
        print(f"all {len(runs)} runs finished: nothing to submit (run collect)")
        return None
    out = grid.out_dir

    def sbatch(*args: str) -> str:
        try:
            done = subprocess.run(
                ["sbatch", "--parsable", *args], capture_output=True, text=True, check=False
            )
        except FileNotFoundError:
            raise SweepError(
                "sbatch not found: use run --local, or run this on a SLURM login node"
            ) from None
        if done.returncode != 0:
            raise SweepError(f"sbatch {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout.strip().split(";")[0]

    array = sbatch(f"--array={','.join(map(str, todo))}", str(out / "sweep.sbatch"))
    collect = sbatch(f"--dependency=afterany:{array}", str(out / "collect.sbatch"))
    print(
        f"submitted array job {array} ({len(todo)} of {len(runs)} runs) and collect job "
        f"{collect} after it; logs in {out / 'slurm'}, results in {out}"
    )
    return array, collect


# --------------------------------------------------------------------------------------------
# collect


def count_active_params(keys: list[tuple[str, str, tuple[str, ...]]], cache: Path) -> dict:
    """Active parameters of each (recipe, variant, args), counted on the meta device.

    One subprocess for all the models missing from ``cache`` (Megatron keeps global state, and
    importing it costs seconds).

    Returns:
        {(recipe, variant, args): active parameter count}.
    """
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    missing = sorted({json.dumps(list(key)) for key in keys} - set(known))
    if missing:
        print(f"counting the parameters of {len(missing)} model(s) on the meta device ...")
        env = {k: v for k, v in os.environ.items() if k not in ("VARIANT", "TP", "PP", "EP")}
        # The launcher variables of an enclosing torchrun/SLURM job must not leak into the
        # one-rank process group of the count.
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        done = subprocess.run(
            [sys.executable, "-c", COUNT_SCRIPT, str(ROOT / "tools"), *ONE_RANK_ARGS],
            input=json.dumps([json.loads(m) for m in missing]),
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            check=False,
        )
        line = next((x for x in done.stdout.splitlines() if x.startswith("ACTIVE ")), None)
        if done.returncode != 0 or line is None:
            tail = (done.stdout + done.stderr)[-2500:]
            raise SweepError(
                f"counting the parameters failed: tools/count_params.py builds each model from "
                f"its recipe's model arguments plus the run's (the grid's args, size, budget) "
                f"at parallel sizes 1; make those arguments valid on their own (parallel "
                f"sizes belong in env: TP, PP, EP). Its output:\n{tail}"
            )
        known.update(zip(missing, json.loads(line.removeprefix("ACTIVE ")), strict=True))
        cache.write_text(json.dumps(known, indent=1) + "\n")
    return {key: known[json.dumps(list(key))] for key in keys}


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def _read_csv(path: Path, step: str) -> list[dict]:
    if not path.is_file():
        raise SweepError(f"{path} not found: run `{step}` first")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_csv(path: Path, fields: tuple[str, ...], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)


def collect(grid: Grid) -> list[dict]:
    """Reads every run's log into ``results.csv`` (one row per planned run, RESULT_FIELDS).

    Returns:
        the rows; unfinished runs have an empty loss and compute.
    """
    runs = plan(grid, quiet=True)
    results = {run.name: _read_result(run) for run in runs}
    finished = [run for run in runs if results[run.name] is not None]
    params = count_active_params(
        [(run.recipe, run.variant, run.args) for run in finished], grid.out_dir / "params.json"
    )
    rows = []
    for run in runs:
        row = {
            "name": run.name,
            "size": run.size,
            "budget": run.budget,
            "variant": run.variant,
            "recipe": run.recipe,
            "log": run.log,
        }
        result = results[run.name]
        if result is None:
            row["status"] = "unfinished" if Path(run.log).exists() else "not started"
        else:
            n_active = params[(run.recipe, run.variant, run.args)]
            row.update(status="finished", active_params=n_active, **result)
            row["compute_flops"] = _fmt(6.0 * n_active * result["tokens"])
            row["final_val_loss"] = _fmt(result["final_val_loss"])
        rows.append(row)
    path = grid.out_dir / "results.csv"
    _write_csv(path, RESULT_FIELDS, rows)
    print(f"{len(finished)} of {len(runs)} runs finished -> {path}")
    for row in rows:
        if row["status"] == "finished":
            print(
                f"  {row['name']:<32} loss {float(row['final_val_loss']):.4f}  N "
                f"{row['active_params']:,}  D {row['tokens']:,}  C {row['compute_flops']}"
            )
        else:
            why = "" if row["status"] == "not started" else f": {_last_error(row['log'])}"
            print(f"  {row['name']:<32} {row['status']} ({row['log']}){why}")
    return rows


# --------------------------------------------------------------------------------------------
# fit


def fit_power_law(compute: np.ndarray, loss: np.ndarray) -> tuple[float, float, float]:
    """Least-squares fit of ``log L = log a - b log C``.

    Args:
        compute: [p] compute of each point, FLOPs (> 0).
        loss: [p] validation loss of each point, nats per token (> 0).

    Returns:
        (a, b, r2): L = a * C**-b, with R^2 of the fit in log-log space.
    """
    x, y = np.log(compute), np.log(loss)
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    total = np.sum((y - y.mean()) ** 2)
    r2 = 1.0 - np.sum(residual**2) / total if total > 0 else float("nan")
    return float(np.exp(intercept)), float(-slope), float(r2)


def fit_variants(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """Fits each variant's finished runs with a finite loss.

    Returns:
        (fit rows with FIT_FIELDS, messages for the variants not fitted and the points left out).
    """
    fits, notes = [], []
    for variant in dict.fromkeys(row["variant"] for row in rows):
        mine = [row for row in rows if row["variant"] == variant]
        ok = [
            r
            for r in mine
            if r["status"] == "finished" and math.isfinite(float(r["final_val_loss"]))
        ]
        left_out = [r["name"] for r in mine if r not in ok]
        if left_out:
            notes.append(
                f"{variant}: left out (unfinished or non-finite loss): {', '.join(left_out)}"
            )
        compute = np.array([float(r["compute_flops"]) for r in ok])
        loss = np.array([float(r["final_val_loss"]) for r in ok])
        if len(set(compute.tolist())) < 2:
            notes.append(
                f"{variant}: not fitted: {len(ok)} finished run(s) with "
                f"{len(set(compute.tolist()))} distinct compute value(s); a power law "
                f"needs at least 2"
            )
            continue
        a, b, r2 = fit_power_law(compute, loss)
        fits.append(
            {
                "variant": variant,
                "a": _fmt(a),
                "b": _fmt(b),
                "r2": _fmt(r2),
                "points": len(ok),
                "compute_min": _fmt(compute.min()),
                "compute_max": _fmt(compute.max()),
                "left_out": " ".join(left_out),
            }
        )
    return fits, notes


def gaps_to_baseline(rows: list[dict], fits: list[dict], baseline: str | None) -> list[dict]:
    """Each variant's loss minus the baseline's at every size and budget both finished.

    ``baseline_compute_ratio``: the compute the baseline's fitted law needs to reach the
    variant's loss, over the variant's compute (> 1: the variant is worth that much more compute
    to the baseline); empty without a baseline fit.
    """
    if baseline is None:
        return []
    done = {(r["size"], r["budget"], r["variant"]): r for r in rows if r["status"] == "finished"}
    base_fit = next((f for f in fits if f["variant"] == baseline), None)
    gaps = []
    for (size, budget, variant), row in done.items():
        base = done.get((size, budget, baseline))
        if variant == baseline or base is None:
            continue
        loss, base_loss = float(row["final_val_loss"]), float(base["final_val_loss"])
        compute = float(row["compute_flops"])
        ratio = ""
        if base_fit is not None and float(base_fit["b"]) > 0 and loss > 0:
            a, b = float(base_fit["a"]), float(base_fit["b"])
            ratio = _fmt((a / loss) ** (1.0 / b) / compute)
        gaps.append(
            {
                "size": size,
                "budget": budget,
                "variant": variant,
                "baseline": baseline,
                "compute_flops": row["compute_flops"],
                "loss": row["final_val_loss"],
                "baseline_loss": base["final_val_loss"],
                "gap": _fmt(loss - base_loss),
                "rel_gap": _fmt((loss - base_loss) / base_loss),
                "baseline_compute_ratio": ratio,
            }
        )
    return gaps


def fit(grid: Grid) -> tuple[list[dict], list[dict]]:
    """results.csv -> fit.csv (per variant) and gaps.csv (per size, budget and variant)."""
    rows = _read_csv(grid.out_dir / "results.csv", "collect")
    fits, notes = fit_variants(rows)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if not fits:
        raise SweepError(
            "no variant has 2 finished runs of different compute: nothing to fit "
            "(see the notes above; run the missing runs, then collect)"
        )
    gaps = gaps_to_baseline(rows, fits, grid.baseline)
    _write_csv(grid.out_dir / "fit.csv", FIT_FIELDS, fits)
    _write_csv(grid.out_dir / "gaps.csv", GAP_FIELDS, gaps)
    for f in fits:
        print(
            f"{f['variant']:<9} L = {float(f['a']):.4g} * C^-{float(f['b']):.4f}  "
            f"(R^2 {float(f['r2']):.3f}, {f['points']} points)"
        )
    for g in gaps:
        print(
            f"  {g['size']}/{g['budget']}: {g['variant']} - {g['baseline']} = "
            f"{float(g['gap']):+.4f} ({100 * float(g['rel_gap']):+.2f}%)"
        )
    print(f"-> {grid.out_dir / 'fit.csv'}, {grid.out_dir / 'gaps.csv'}")
    return fits, gaps


# --------------------------------------------------------------------------------------------
# plot

PLOT_DPI = 120  # drawn and saved at the same resolution: the label placement is in pixels
POINT_LABEL_GID = "point-label"  # the gid of the (size, budget) labels next to the points
LABEL_FONTSIZE = 7
# Major (labelled) tick choices on a log axis, densest first: the first whose labels are at
# least TICK_GAP_PT apart and at least 2 of them in view wins. Mantissas within each decade,
# then decades only, then a stride over the decades, then linear steps for a view narrower
# than a factor of ~4 (no two log ticks in it).
LOG_SUBS = ((1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 3, 5), (1, 2, 5), (1, 3), (1,))
DECADE_NUMTICKS = (6, 4, 3)
LINEAR_NBINS = (6, 4, 3, 2)
TICK_GAP_PT = 4.0
LABEL_GAP_PT = 3.0  # between a point label and its points, other labels and the legend
LABEL_MERGE_PT = 30.0  # points of one size/budget closer than this share one label
# Where a label may go around its point, (x, y): +-1 just clear of the point (further on each
# ring), 0.5 half a label's width or height over. Above-right first: a falling fit line
# through the points stays clear of it.
LABEL_DIRECTIONS = np.array(
    [
        [1, 0, 0.5, -0.5, -1, 1, -1, 1, -1, 1, -1, 1, 0, 0.5, -0.5, -1],
        [1, 1, 1, 1, 1, 0, 0, 0.5, 0.5, -0.5, -0.5, -1, -1, -1, -1, -1],
    ]
)


def _number(value: float) -> str:
    """A tick label or coefficient as a plain number.

    0.01 <= |value| < 10,000 is written out (4 significant digits); anything else as a mantissa
    of up to 3 significant digits, 'e' and the exponent without '+' or leading zeros.

    Args:
        value: the number.

    Returns:
        e.g. 0.9 -> '0.9', 3.0 -> '3', 2e10 -> '2e10', 3.99767e8 -> '4e8', 1.5e-05 -> '1.5e-5'.
    """
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    text = f"{value:.4g}"
    if 1e-2 <= abs(value) < 1e4 and "e" not in text:
        return text
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _extents(artist, renderer) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of an artist's window extent, in display pixels."""
    box = artist.get_window_extent(renderer)
    return (box.x0, box.y0, box.x1, box.y1)


def _overlap_area(a: tuple[float, ...], b: tuple[float, ...], pad: float = 0.0) -> float:
    """Area in which box ``a`` grown by ``pad`` on every side intersects box ``b``.

    Args:
        a: (x0, y0, x1, y1).
        b: (x0, y0, x1, y1).
        pad: the margin kept around ``a``, same units.

    Returns:
        0.0 when the two are at least ``pad`` apart.
    """
    width = min(a[2] + pad, b[2]) - max(a[0] - pad, b[0])
    height = min(a[3] + pad, b[3]) - max(a[1] - pad, b[1])
    return max(width, 0.0) * max(height, 0.0)


def _overlap_areas(boxes: np.ndarray, others: np.ndarray, pad: float) -> np.ndarray:
    """``_overlap_area`` of every box with every other box.

    Args:
        boxes: [c, 4] (x0, y0, x1, y1), grown by ``pad`` on every side.
        others: [m, 4] (x0, y0, x1, y1); m may be 0.
        pad: the margin kept around ``boxes``.

    Returns:
        [c, m] intersection areas.
    """
    if len(others) == 0:
        return np.zeros((len(boxes), 0))
    b, o = boxes[:, None, :], others[None, :, :]
    width = np.minimum(b[..., 2] + pad, o[..., 2]) - np.maximum(b[..., 0] - pad, o[..., 0])
    height = np.minimum(b[..., 3] + pad, o[..., 3]) - np.maximum(b[..., 1] - pad, o[..., 1])
    return np.maximum(width, 0.0) * np.maximum(height, 0.0)


def _visible_tick_labels(axis) -> list:
    """The major tick labels of a matplotlib axis inside its view limits, as last drawn.

    Args:
        axis: ``ax.xaxis`` or ``ax.yaxis`` of a figure drawn at least once.

    Returns:
        the ``Text`` of every visible major tick label inside the view, in tick order.
    """
    lo, hi = sorted(axis.get_view_interval())
    slack = 1e-9 * (hi - lo)
    return [
        tick.label1
        for tick in axis.get_major_ticks()
        if lo - slack <= tick.get_loc() <= hi + slack and tick.label1.get_visible()
    ]


def _log_tick_locators():
    """The major tick locators tried on a log axis, densest first (LOG_SUBS)."""
    from matplotlib.ticker import LogLocator, MaxNLocator

    for subs in LOG_SUBS:
        yield LogLocator(subs=subs)
    for numticks in DECADE_NUMTICKS:
        yield LogLocator(subs=(1.0,), numticks=numticks)
    for nbins in LINEAR_NBINS:
        yield MaxNLocator(nbins=nbins, steps=[1, 2, 2.5, 5, 10])


def _readable_log_ticks(axis, renderer) -> None:
    """Labels a log axis with plain numbers that do not crowd each other.

    Major ticks: the densest of ``_log_tick_locators`` with at least 2 labels in view, each at
    least TICK_GAP_PT from the next, formatted by ``_number``. Minor ticks: every mantissa,
    unlabelled (matplotlib's default labels some of them on a short axis, in mathtext, next to
    the major labels). Measured on the current layout of the figure.

    Args:
        axis: ``ax.xaxis`` or ``ax.yaxis`` on a log scale.
        renderer: the figure canvas's renderer.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda value, _pos: _number(value)))
    axis.set_minor_locator(LogLocator(subs="auto"))
    axis.set_minor_formatter(NullFormatter())
    pad = TICK_GAP_PT * axis.figure.dpi / 72
    for locator in _log_tick_locators():
        axis.set_major_locator(locator)
        axis.get_tightbbox(renderer)  # places and formats the ticks in view
        labels = _visible_tick_labels(axis)
        boxes = [_extents(label, renderer) for label in labels]
        crowded = any(
            _overlap_area(a, b, pad) > 0 for i, a in enumerate(boxes) for b in boxes[i + 1 :]
        )
        if len(labels) >= 2 and all(label.get_text() for label in labels) and not crowded:
            return
    axis.set_major_locator(LogLocator(subs=(1.0,), numticks=DECADE_NUMTICKS[-1]))


def _freeze_legend(legend, renderer) -> None:
    """Pins a legend placed by loc='best' where it is, so later labels can keep clear of it."""
    box = legend.get_window_extent(renderer)
    x0, y0 = legend.axes.transAxes.inverted().transform((box.x0, box.y0))
    legend.set_loc((float(x0), float(y0)))


def _clusters(named: list[tuple[str, np.ndarray]], merge_px: float) -> list[tuple[str, np.ndarray]]:
    """Joins the points of one name that lie within ``merge_px`` of each other (a chain counts).

    Args:
        named: (name, [2] display position) per point.
        merge_px: the largest distance between joined points, pixels.

    Returns:
        (name, [k, 2] positions) per cluster, in the order of their first point.
    """
    clusters: list[tuple[str, list[np.ndarray]]] = []
    for name, xy in named:
        near = [
            c
            for c in clusters
            if c[0] == name and min(np.hypot(*(xy - p)) for p in c[1]) <= merge_px
        ]
        merged = (name, [xy] + [p for c in near for p in c[1]])
        clusters = [c for c in clusters if not any(c is n for n in near)] + [merged]
    return [(name, np.array(points)) for name, points in clusters]


def _label_points(ax, named: list[tuple[str, tuple[float, float]]], renderer) -> list:
    """Names the points of an axes with labels that keep clear of each other.

    Points of one name closer than LABEL_MERGE_PT (the variants of one size and budget at almost
    the same compute and loss) share one label. Each label takes the spot nearest its points
    that is inside the axes and LABEL_GAP_PT clear of every point, of the labels placed before
    it and of the legend; a drawn line (a fit, the zero line) through a spot counts as one label
    height of distance. With no such spot: the one that overlaps least.

    Args:
        ax: the axes, laid out (the figure drawn once, its layout frozen).
        named: (label text, (x, y) in data coordinates) per point.
        renderer: the figure canvas's renderer.

    Returns:
        the label annotations, gid POINT_LABEL_GID.
    """
    pt = ax.figure.dpi / 72
    gap = LABEL_GAP_PT * pt
    half = (ax.lines[0].get_markersize() / 2 if ax.lines else 3.0) * pt + 1.0
    display = [(name, ax.transData.transform(xy)) for name, xy in named]
    hard = [(x - half, y - half, x + half, y + half) for _, (x, y) in display]
    legend = ax.get_legend()
    if legend is not None:
        hard.append(_extents(legend, renderer))
    inside = (ax.bbox.x0 + 2 * pt, ax.bbox.y0 + 2 * pt, ax.bbox.x1 - 2 * pt, ax.bbox.y1 - 2 * pt)
    curves = []  # the drawn lines, every ~2 px
    for line in ax.get_lines():
        if line.get_linestyle() in ("None", "none", " ", ""):
            continue
        xy = line.get_transform().transform(line.get_xydata())
        for a, b in zip(xy[:-1], xy[1:], strict=True):
            steps = max(2, int(np.hypot(*(b - a)) / 2) + 1)
            curves.append(a + np.linspace(0, 1, steps)[:, None] * (b - a))
    curve = np.concatenate(curves) if curves else np.zeros((0, 2))
    placed = []
    clusters = _clusters(display, LABEL_MERGE_PT * pt)
    for name, points in sorted(clusters, key=lambda c: c[1][:, 0].min()):
        text = ax.annotate(
            name,
            xy=ax.transData.inverted().transform(points[0]),
            xytext=(0, 0),
            textcoords="offset points",
            ha="center",
            va="center",
            fontsize=LABEL_FONTSIZE,
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.7},
            gid=POINT_LABEL_GID,
        )
        text.set_in_layout(False)
        x0, y0, x1, y1 = _extents(text, renderer)
        w, h = x1 - x0, y1 - y0
        # Candidate centres around each point, LABEL_DIRECTIONS on rings further and further out.
        ring = np.arange(10.0)[:, None]
        dx = half + gap + w / 2 + ring * w / 3
        dy = half + gap + h / 2 + ring * h / 2
        ux, uy = LABEL_DIRECTIONS
        offsets = np.stack(
            [np.where(abs(ux) == 1, ux * dx, ux * w), np.where(abs(uy) == 1, uy * dy, uy * h)],
            axis=-1,
        ).reshape(-1, 2)  # [rings x directions, 2], nearest ring first
        centres = (points[:, None, :] + offsets[None]).reshape(-1, 2)
        boxes = np.hstack([centres - (w / 2, h / 2), centres + (w / 2, h / 2)])  # [c, 4]
        out = np.maximum(w * h - _overlap_areas(boxes, np.array([inside]), 0.0)[:, 0], 0.0)
        clash = _overlap_areas(boxes, np.array(hard + placed), gap).sum(axis=1)
        crossed = (
            (curve[None, :, 0] >= boxes[:, None, 0] - 1)
            & (curve[None, :, 0] <= boxes[:, None, 2] + 1)
            & (curve[None, :, 1] >= boxes[:, None, 1] - 1)
            & (curve[None, :, 1] <= boxes[:, None, 3] + 1)
        ).any(axis=1)
        off_x = np.maximum(
            boxes[:, None, 0] - points[None, :, 0], points[None, :, 0] - boxes[:, None, 2]
        )
        off_y = np.maximum(
            boxes[:, None, 1] - points[None, :, 1], points[None, :, 1] - boxes[:, None, 3]
        )
        near = np.hypot(np.maximum(off_x, 0), np.maximum(off_y, 0)).min(axis=1)
        # Clear spots first (ties: the first, nearest ring), then the nearest.
        best = np.lexsort((near + h * crossed, np.round(10 * out + clash, 3)))[0]
        cx, cy = centres[best]
        text.set_position(((cx - points[0][0]) / pt, (cy - points[0][1]) / pt))
        placed.append(_extents(text, renderer))
    return [t for t in ax.texts if t.get_gid() == POINT_LABEL_GID]


def scaling_figure(grid: Grid, rows: list[dict], fits: list[dict], gaps: list[dict]):
    """Draws loss vs compute with the fitted laws, and the gaps to the baseline.

    Left: the final validation loss of every finished run against its compute (log-log), one
    colour per variant, one marker per size, and each variant's fitted ``L = a C^-b`` over its
    compute range x/1.5 .. x1.5. Right: each variant's loss minus the baseline's at every size
    and budget both finished. One label per size and budget names its points (the variants of a
    size and budget sit close together), placed clear of the other labels, the points and the
    legend; log axes carry plain-number ticks that do not crowd (``_readable_log_ticks``).

    Args:
        grid: the grid (name, variants, sizes, baseline).
        rows: results.csv rows (finished and not; only the finished are drawn).
        fits: fit.csv rows.
        gaps: gaps.csv rows.

    Returns:
        the ``matplotlib.figure.Figure`` on an Agg canvas, drawn and laid out (layout frozen).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in rows if r["status"] == "finished"]
    fits = {f["variant"]: f for f in fits}
    fig = Figure(figsize=(12, 4.8), dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax, ax_gap = fig.subplots(1, 2)
    colors = {v: f"C{i}" for i, v in enumerate(grid.variants)}
    markers = dict(zip(grid.sizes, "osD^vP*Xh", strict=False))
    named: list[tuple[str, tuple[float, float]]] = []
    for variant in grid.variants:
        for r in (r for r in rows if r["variant"] == variant):
            xy = (float(r["compute_flops"]), float(r["final_val_loss"]))
            ax.loglog(*xy, ls="none", marker=markers.get(r["size"], "o"), color=colors[variant])
            named.append((f"{r['size']}/{r['budget']}", xy))
        label = variant
        if variant in fits:
            f = fits[variant]
            a, b = float(f["a"]), float(f["b"])
            c = np.geomspace(float(f["compute_min"]) / 1.5, float(f["compute_max"]) * 1.5, 50)
            label = f"{variant}: L = {_number(a)} C^-{b:.4f} (R²={float(f['r2']):.3f})"
            ax.loglog(c, a * c**-b, color=colors[variant], lw=1.2)
        ax.plot([], [], color=colors[variant], marker="o", label=label)
    ax.set(
        xlabel="compute C = 6·N_active·D (FLOPs)",
        ylabel="final validation loss (nats)",
        title=f"{grid.path.stem}: loss vs compute",
    )
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    gap_named: list[tuple[str, tuple[float, float]]] = []
    if gaps:
        for variant in dict.fromkeys(g["variant"] for g in gaps):
            mine = [g for g in gaps if g["variant"] == variant]
            ax_gap.semilogx(
                [float(g["compute_flops"]) for g in mine],
                [float(g["gap"]) for g in mine],
                ls="none",
                marker="o",
                color=colors.get(variant, "k"),
                label=f"{variant} - {grid.baseline}",
            )
            for g in mine:
                xy = (float(g["compute_flops"]), float(g["gap"]))
                gap_named.append((f"{g['size']}/{g['budget']}", xy))
        ax_gap.axhline(0.0, color="k", lw=0.8)
        ax_gap.legend(fontsize=8)
    else:
        ax_gap.text(
            0.5,
            0.5,
            "no gaps: no baseline with a finished run of the same size and budget",
            ha="center",
            va="center",
            transform=ax_gap.transAxes,
            fontsize=8,
        )
    ax_gap.set(
        xlabel="compute (FLOPs)",
        ylabel="loss - baseline loss (nats; < 0: better)",
        title="gap to the baseline at each size/budget",
    )
    ax_gap.grid(True, which="both", alpha=0.3)

    # Ticks change the layout, the layout moves the points: ticks, then the layout (frozen),
    # then the labels in the pixels they will be saved at.
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for axis in (ax.xaxis, ax.yaxis, ax_gap.xaxis, ax_gap.yaxis):
        if axis.get_scale() == "log":
            _readable_log_ticks(axis, renderer)
    fig.canvas.draw()
    fig.set_layout_engine("none")
    for axes, points in ((ax, named), (ax_gap, gap_named)):
        if axes.get_legend() is not None:
            _freeze_legend(axes.get_legend(), renderer)
        if points:
            _label_points(axes, points, renderer)
    return fig


def plot(grid: Grid) -> Path:
    """results.csv + fit.csv + gaps.csv -> scaling.png: loss vs compute, and the gaps.

    Returns:
        the path of scaling.png.
    """
    fig = scaling_figure(
        grid,
        _read_csv(grid.out_dir / "results.csv", "collect"),
        _read_csv(grid.out_dir / "fit.csv", "fit"),
        _read_csv(grid.out_dir / "gaps.csv", "fit"),
    )
    path = grid.out_dir / "scaling.png"
    fig.savefig(path, dpi=PLOT_DPI)
    print(f"-> {path}")
    return path


# --------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    """The command line (module docstring). Returns the exit code."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "plan": "write the runs file and the SLURM scripts, print the runs",
        "run": "run the unfinished runs (--local) or submit them as a SLURM array (--slurm)",
        "collect": "read the runs' logs into results.csv",
        "fit": "power-law fit per variant (fit.csv) and gaps to the baseline (gaps.csv)",
        "plot": "scaling.png from the CSVs",
        "all": "plan, run --local, collect, fit, plot",
    }
    parsers = {}
    for name, help_text in commands.items():
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
    opts = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
