"""Launching a sweep without training: the plan's SLURM scripts, an array task's checks, the
SLURM submission with a stand-in sbatch, and a failed local run named with its log."""

import json
import os
import shlex
import subprocess
import textwrap
from pathlib import Path

import pytest

from mhc_megatron.sweep.grid import load_grid
from mhc_megatron.sweep.plan import plan
from mhc_megatron.sweep.runlog import COMMAND_HEADER
from tests.tools.sweep_helpers import (
    ARRAY_TASK,
    EXAMPLE_GRID,
    FINISHED,
    GOOD,
    LOG,
    ORDER,
    cli,
    env,
    read_rows,
)


@pytest.fixture
def planned(tmp_path, capsys):
    """The example grid (2 sizes x 2 budgets x 2 variants) planned: (grid, runs, printed)."""
    grid = load_grid(EXAMPLE_GRID, tmp_path / "out")
    runs = plan(grid)
    return grid, runs, capsys.readouterr().out


def _finish(run) -> None:
    """Gives ``run`` the log of a launch with its own settings that finished."""
    Path(run.run_dir).mkdir(parents=True, exist_ok=True)
    Path(run.log).write_text(f"{COMMAND_HEADER}{shlex.join(run.command())}\n{LOG}")


def test_plan_writes_the_runs_and_valid_slurm_scripts(planned):
    grid, runs, printed = planned
    out = grid.out_dir
    script = (out / "sweep.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(out / "sweep.sbatch")]).returncode == 0
    assert subprocess.run(["bash", "-n", str(out / "collect.sbatch")]).returncode == 0
    assert f"#SBATCH --array=0-{len(ORDER) - 1}\n" in script
    lines = (out / "runs.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == ORDER
    assert lines[2].split("\t")[2] == shlex.join(runs[2].command())
    assert json.loads((out / "plan.json").read_text())["runs"][2]["name"] == ARRAY_TASK
    assert f"{len(ORDER)} runs (2 sizes x 2 budgets x 2 variants)" in printed


def test_an_array_task_skips_its_finished_run_and_refuses_a_missing_index(planned):
    grid, runs, _ = planned
    _finish(runs[2])
    before = Path(runs[2].log).read_text()

    def task(index: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(grid.out_dir / "sweep.sbatch")],
            env=env(SLURM_ARRAY_TASK_ID=index),
            capture_output=True,
            text=True,
            timeout=30,
        )

    again = task("2")
    assert again.returncode == 0 and f"run {ARRAY_TASK}: finished already" in again.stdout
    assert Path(runs[2].log).read_text() == before  # not launched: nothing appended
    missing = task("8")
    assert missing.returncode == 2 and "no run 8" in missing.stderr


def test_run_slurm_submits_the_unfinished_runs_then_the_collect_job(planned, tmp_path):
    """A stand-in sbatch on PATH records its arguments: the array holds only the unfinished
    runs, and the collect job waits for it (afterany); with every run finished, nothing."""
    grid, runs, _ = planned
    for run in runs:
        if run.name in FINISHED:
            _finish(run)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    fake = bin_dir / "sbatch"
    fake.write_text(
        textwrap.dedent(f"""\
        #!/bin/bash
        echo "$*" >> {calls}
        n=$(wc -l < {calls}); echo "$((1000 + n));cluster"
    """)
    )
    fake.chmod(0o755)
    slurm_env = env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = grid.out_dir
    proc = cli("run", EXAMPLE_GRID, "--out", out, "--slurm", env_vars=slurm_env)
    assert proc.returncode == 0, proc.stderr
    unfinished = ",".join(str(ORDER.index(n)) for n in ORDER if n not in FINISHED)
    assert calls.read_text().splitlines() == [
        f"--parsable --array={unfinished} {out / 'sweep.sbatch'}",
        f"--parsable --dependency=afterany:1001 {out / 'collect.sbatch'}",
    ]
    assert "submitted array job 1001 (3 of 8 runs) and collect job 1002" in proc.stdout

    for run in runs:
        _finish(run)
    proc = cli("run", EXAMPLE_GRID, "--out", out, "--slurm", env_vars=slurm_env)
    assert proc.returncode == 0, proc.stderr
    assert "all 8 runs finished: nothing to submit" in proc.stdout
    assert len(calls.read_text().splitlines()) == 2  # sbatch not called again


def test_a_failed_run_is_named_with_its_log_and_nothing_is_fitted(tmp_path):
    """NNODES=2 without MASTER_ADDR: run.sh stops before Python starts (a cheap real failure)."""
    path = tmp_path / "grid.yaml"
    path.write_text(GOOD.replace("[residual, mhc]", "[residual]") + "cpu: true\nenv: {NNODES: 2}\n")
    proc = cli("all", path, "--out", tmp_path / "out", "--timeout", 60)
    log = tmp_path / "out" / "runs" / "s1-short-residual" / "train.log"
    assert proc.returncode == 2, proc.stdout + proc.stderr  # fit refuses: nothing finished
    assert "FAILED s1-short-residual in" in proc.stdout
    assert "MASTER_ADDR (the first node) is needed" in proc.stdout and str(log) in proc.stdout
    assert f"  s1-short-residual: {log}" in proc.stderr  # the summary of failures
    assert "unfinished" in proc.stdout  # collect
    assert "residual: not fitted: 0 finished run(s)" in proc.stderr
    assert "error: no variant has 2 finished runs" in proc.stderr
    rows = read_rows(tmp_path / "out" / "results.csv")
    assert [(r["name"], r["status"], r["final_val_loss"]) for r in rows] == [
        ("s1-short-residual", "unfinished", "")
    ]
