"""A tiny scaling sweep trained on CPU end to end: local runs, one SLURM array task run by hand,
collect, fit and plot, and a second run that only skips.

One module-scoped launch serves every test: 2 sizes x 2 budgets x 2 variants = 8 planned runs,
of which 5 are trained: the four short ones locally and s1-long-residual as an array task. The
rest stay unfinished on purpose: the fit must use what finished and name what is missing.
"""

import math
import subprocess
import time

import pytest

from mhc_megatron.processes import free_port, kill_tree
from tests.tools.sweep_helpers import (
    ARRAY_TASK,
    FINISHED,
    LOCAL,
    ORDER,
    PNG_MAGIC,
    cli,
    env,
    read_rows,
)

pytestmark = pytest.mark.slow  # trains 5 models (~15-40 s each on a 2-core machine)

# Tiny and few steps: each run is ~15 s of start-up. --save '' skips the checkpoint (~4 s a run);
# Megatron's argument check still wants a --save-interval with it. --load '' goes with it:
# run.sh's --load of a checkpoint directory that will never exist is refused.
E2E_GRID = """
recipe: tiny
cpu: true
variants: [residual, mhc]
sizes:
  s1: [--num-layers, 2, --moe-layer-freq, "([0]*1+[1]*1)", --hidden-size, 32]
  s2: [--num-layers, 2, --moe-layer-freq, "([0]*1+[1]*1)", --hidden-size, 64]
budgets:
  short: [--train-iters, 4]
  long: [--train-iters, 8]
args: [--lr-warmup-iters, 1, --eval-interval, 1000, --eval-iters, 1, --log-interval, 2,
       --save, "", --load, "", --save-interval, 1000]
"""
RUN_TIMEOUT_S = 240  # per training run (the tool kills the process group): ~15-40 s each


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """Plans the grid, runs one array task by hand while the short runs train locally, then
    `all` (which must only skip), and a second `run` for the resume timing."""
    tmp = tmp_path_factory.mktemp("sweep")
    grid, out = tmp / "grid.yaml", tmp / "out"
    grid.write_text(E2E_GRID)
    info = {"grid": grid, "out": out}
    planned = cli("plan", grid, "--out", out)
    assert planned.returncode == 0, planned.stderr

    index = ORDER.index(ARRAY_TASK)
    task_env = env(SLURM_ARRAY_TASK_ID=str(index), SWEEP_MASTER_PORT=str(free_port()))
    task = subprocess.Popen(
        ["bash", str(out / "sweep.sbatch")],
        env=task_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        local = ["--local", "--jobs", 2, "--only", "*-short-*", "--timeout", RUN_TIMEOUT_S]
        info["run"] = cli("run", grid, "--out", out, *local)
        info["task_output"] = task.communicate(timeout=RUN_TIMEOUT_S)[0]
        info["task_rc"] = task.returncode
    finally:
        if task.poll() is None:
            kill_tree(task)
            task.wait()
    logs = {name: (out / "runs" / name / "train.log").stat() for name in FINISHED}
    info["all"] = cli("all", grid, "--out", out, "--only", *FINISHED)
    start = time.monotonic()
    info["rerun"] = cli("run", grid, "--out", out, "--local", "--only", *FINISHED)
    info["rerun_s"] = time.monotonic() - start
    info["logs_untouched"] = all(
        (out / "runs" / name / "train.log").stat().st_mtime_ns == stat.st_mtime_ns
        for name, stat in logs.items()
    )
    return info


def test_one_array_task_runs_its_run_locally(e2e):
    assert e2e["task_rc"] == 0, e2e["task_output"][-3000:]
    log = e2e["out"] / "runs" / ARRAY_TASK / "train.log"
    assert f"run {ARRAY_TASK}: log {log}" in e2e["task_output"]
    text = log.read_text()
    assert "# scaling_sweep: array task 2 on" in text
    assert "recipe tiny, variant residual" in text  # run.sh's banner: the right run


def test_local_runs_then_all_collects_fits_and_plots(e2e):
    assert e2e["run"].returncode == 0, e2e["run"].stdout[-3000:] + e2e["run"].stderr[-3000:]
    assert all(f"done {name} in" in e2e["run"].stdout for name in LOCAL)
    proc = e2e["all"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all(f"skip {name}: finished" in proc.stdout for name in FINISHED)
    assert f"{len(FINISHED)} of {len(ORDER)} runs finished" in proc.stdout

    rows = {r["name"]: r for r in read_rows(e2e["out"] / "results.csv")}
    assert list(rows) == ORDER  # every planned run, finished or not
    for name in ORDER:
        row = rows[name]
        if name in FINISHED:
            assert row["status"] == "finished"
            assert math.isfinite(float(row["final_val_loss"])) and float(row["compute_flops"]) > 0
            assert float(row["compute_flops"]) == pytest.approx(
                6 * int(row["active_params"]) * int(row["tokens"]), rel=1e-5
            )
        else:
            assert row["status"] == "not started" and row["final_val_loss"] == ""
            assert f"{name:<32} not started" in proc.stdout  # named, with its log
    compute = {name: float(rows[name]["compute_flops"]) for name in FINISHED}
    params = {name: int(rows[name]["active_params"]) for name in FINISHED}
    for variant in ("residual", "mhc"):  # grows with size
        assert compute[f"s2-short-{variant}"] > compute[f"s1-short-{variant}"]
        assert params[f"s2-short-{variant}"] > params[f"s1-short-{variant}"]
    # Grows with the budget: same model, twice the steps of 4 sequences of 128 tokens.
    assert params["s1-long-residual"] == params["s1-short-residual"]
    assert int(rows["s1-long-residual"]["tokens"]) == 8 * 4 * 128
    assert compute["s1-long-residual"] == pytest.approx(2 * compute["s1-short-residual"], rel=1e-5)
    assert params["s1-short-mhc"] > params["s1-short-residual"]  # the mHC parameters

    fits = {f["variant"]: f for f in read_rows(e2e["out"] / "fit.csv")}
    assert set(fits) == {"residual", "mhc"}
    assert fits["residual"]["points"] == "3" and fits["mhc"]["points"] == "2"
    assert all(math.isfinite(float(f["b"])) and float(f["a"]) > 0 for f in fits.values())
    assert fits["mhc"]["left_out"] == "s1-long-mhc s2-long-mhc"
    assert "note: mhc: left out (unfinished or non-finite loss): s1-long-mhc" in proc.stderr
    gaps = read_rows(e2e["out"] / "gaps.csv")
    assert [(g["size"], g["budget"], g["variant"]) for g in gaps] == [
        ("s1", "short", "mhc"),
        ("s2", "short", "mhc"),
    ]
    for g in gaps:
        loss = float(rows[f"{g['size']}-short-mhc"]["final_val_loss"])
        base = float(rows[f"{g['size']}-short-residual"]["final_val_loss"])
        assert float(g["gap"]) == pytest.approx(loss - base, abs=2e-6)  # 6 significant digits

    png = (e2e["out"] / "scaling.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_a_second_run_skips_the_finished_runs(e2e):
    proc = e2e["rerun"]
    assert proc.returncode == 0, proc.stderr
    assert all(f"skip {name}: finished" in proc.stdout for name in FINISHED)
    assert f"all {len(FINISHED)} runs finished" in proc.stdout
    assert e2e["logs_untouched"]
    assert e2e["rerun_s"] < 10  # a Python start and reading 5 logs; a run would take ~15 s+
