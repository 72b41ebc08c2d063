"""A sweep's results: every run's log read into ``results.csv``, and the CSV helpers.

Per finished run: final validation loss, tokens D, active parameters N and compute
C = 6 * N * D (the package docstring says what each leaves out).
"""

from __future__ import annotations

import csv
from pathlib import Path

from mhc_megatron.sweep.grid import Grid, SweepError
from mhc_megatron.sweep.params import count_active_params
from mhc_megatron.sweep.plan import plan
from mhc_megatron.sweep.runlog import last_error, read_result

RESULT_FIELDS = (
    "name", "size", "budget", "variant", "recipe", "status", "iterations", "samples",
    "seq_length", "tokens", "active_params", "compute_flops", "final_val_loss", "log",
)  # fmt: skip


def fmt(value: float) -> str:
    """A number for the CSVs: 6 significant digits."""
    return f"{value:.6g}"


def read_csv(path: Path, step: str) -> list[dict]:
    """The rows of a CSV the sweep wrote.

    Args:
        path: the CSV.
        step: the subcommand that writes it (for the error message).

    Returns:
        one dict per row, values as strings.

    Raises:
        SweepError: no such file: run ``step`` first.
    """
    if not path.is_file():
        raise SweepError(f"{path} not found: run `{step}` first")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, fields: tuple[str, ...], rows: list[dict]) -> None:
    """Writes ``rows`` (dicts with keys among ``fields``) to ``path`` with a header line."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)


def collect(grid: Grid) -> list[dict]:
    """Reads every run's log into ``results.csv`` (one row per planned run, RESULT_FIELDS).

    Args:
        grid: the grid (planned again first).

    Returns:
        the rows; unfinished runs have an empty loss and compute.
    """
    runs = plan(grid, quiet=True)
    results = {run.name: read_result(run) for run in runs}
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
            row["compute_flops"] = fmt(6.0 * n_active * result["tokens"])
            row["final_val_loss"] = fmt(result["final_val_loss"])
        rows.append(row)
    path = grid.out_dir / "results.csv"
    write_csv(path, RESULT_FIELDS, rows)
    print(f"{len(finished)} of {len(runs)} runs finished -> {path}")
    for row in rows:
        if row["status"] == "finished":
            print(
                f"  {row['name']:<32} loss {float(row['final_val_loss']):.4f}  N "
                f"{row['active_params']:,}  D {row['tokens']:,}  C {row['compute_flops']}"
            )
        else:
            why = "" if row["status"] == "not started" else f": {last_error(row['log'])}"
            print(f"  {row['name']:<32} {row['status']} ({row['log']}){why}")
    return rows
