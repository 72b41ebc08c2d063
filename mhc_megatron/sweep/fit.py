"""The scaling-law fit of a sweep: ``L(C) = a * C**-b`` per variant, and the gaps to the baseline.

Power law without an irreducible term: with a few points per variant the three-parameter
``E + a * C**-b`` is ill-determined (E and b trade off), while a line in log-log space is plain
linear least squares. The price: extrapolated far beyond the fitted compute, the pure power law
falls faster than a loss with a floor would.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from mhc_megatron.sweep.grid import Grid, SweepError
from mhc_megatron.sweep.results import fmt, read_csv, write_csv

FIT_FIELDS = ("variant", "a", "b", "r2", "points", "compute_min", "compute_max", "left_out")
GAP_FIELDS = (
    "size", "budget", "variant", "baseline", "compute_flops", "loss", "baseline_loss", "gap",
    "rel_gap", "baseline_compute_ratio",
)  # fmt: skip


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

    Args:
        rows: results.csv rows.

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
                "a": fmt(a),
                "b": fmt(b),
                "r2": fmt(r2),
                "points": len(ok),
                "compute_min": fmt(compute.min()),
                "compute_max": fmt(compute.max()),
                "left_out": " ".join(left_out),
            }
        )
    return fits, notes


def gaps_to_baseline(rows: list[dict], fits: list[dict], baseline: str | None) -> list[dict]:
    """Each variant's loss minus the baseline's at every size and budget both finished.

    ``baseline_compute_ratio``: the compute the baseline's fitted law needs to reach the
    variant's loss, over the variant's compute (> 1: the variant is worth that much more compute
    to the baseline); empty without a baseline fit.

    Args:
        rows: results.csv rows.
        fits: ``fit_variants``' rows.
        baseline: the baseline variant (None: no gaps).

    Returns:
        gap rows with GAP_FIELDS.
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
            ratio = fmt((a / loss) ** (1.0 / b) / compute)
        gaps.append(
            {
                "size": size,
                "budget": budget,
                "variant": variant,
                "baseline": baseline,
                "compute_flops": row["compute_flops"],
                "loss": row["final_val_loss"],
                "baseline_loss": base["final_val_loss"],
                "gap": fmt(loss - base_loss),
                "rel_gap": fmt((loss - base_loss) / base_loss),
                "baseline_compute_ratio": ratio,
            }
        )
    return gaps


def fit(grid: Grid) -> tuple[list[dict], list[dict]]:
    """results.csv -> fit.csv (per variant) and gaps.csv (per size, budget and variant).

    Args:
        grid: the grid (its output directory and baseline).

    Returns:
        (fit rows, gap rows).

    Raises:
        SweepError: no results.csv, or no variant could be fitted.
    """
    rows = read_csv(grid.out_dir / "results.csv", "collect")
    fits, notes = fit_variants(rows)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if not fits:
        raise SweepError(
            "no variant has 2 finished runs of different compute: nothing to fit "
            "(see the notes above; run the missing runs, then collect)"
        )
    gaps = gaps_to_baseline(rows, fits, grid.baseline)
    write_csv(grid.out_dir / "fit.csv", FIT_FIELDS, fits)
    write_csv(grid.out_dir / "gaps.csv", GAP_FIELDS, gaps)
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
