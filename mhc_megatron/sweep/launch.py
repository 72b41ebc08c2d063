"""Launching a sweep's unfinished runs: on this machine, or as a SLURM array job.

A run is finished when its log holds its final validation loss (``runlog.read_result``): both
launchers skip those, so running them again resumes a sweep.
"""

from __future__ import annotations

import fnmatch
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mhc_megatron.processes import free_port, kill_tree, wait_or_kill
from mhc_megatron.sweep.grid import Grid, Run, SweepError
from mhc_megatron.sweep.plan import plan
from mhc_megatron.sweep.runlog import COMMAND_HEADER, last_error, read_result


def _launch(
    run: Run, timeout_s: float | None, running: set, stop: threading.Event
) -> tuple[str, float]:
    """Runs one run, appending to its log.

    Args:
        run: the run.
        timeout_s: kill it after this many seconds (None: no limit).
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
    if read_result(run) is None:
        return f"exit code {rc}, no final validation loss: {last_error(run.log)}", seconds
    return "", seconds


def select(runs: list[Run], only: list[str] | None) -> list[Run]:
    """The runs whose name matches one of the shell patterns ``only`` (all for None or []).

    Raises:
        SweepError: no run matches.
    """
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

    Args:
        grid: the grid (planned again first).
        jobs: runs at a time.
        timeout_s: kill a run's process tree after this many seconds (None: no limit).
        only: shell patterns of the run names to consider (None: all).

    Returns:
        the names of the runs that failed (each printed with its log and last error line).

    Raises:
        SweepError: interrupted (the running runs are killed), or a log of other settings.
    """
    runs = select(plan(grid, quiet=True), only)
    todo = []
    for run in runs:
        result = read_result(run)
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

    Args:
        grid: the grid (planned again first).

    Returns:
        (array job id, collect job id), or None when every run has finished.

    Raises:
        SweepError: no sbatch, or it refused a job.
    """
    runs = plan(grid, quiet=True)
    todo = [run.index for run in runs if read_result(run) is None]
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
