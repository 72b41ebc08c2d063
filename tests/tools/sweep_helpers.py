"""What the scaling-sweep tests share: a grid, a finished run's log, the command line, CSV rows."""

import csv
import math
import os
import subprocess
import sys

from tests.launching import REPO_ROOT

TOOL = REPO_ROOT / "tools" / "scaling_sweep.py"
EXAMPLE_GRID = REPO_ROOT / "examples" / "scaling" / "tiny_grid.yaml"
EXAMPLE_RESULTS = REPO_ROOT / "examples" / "scaling" / "results"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The run names of a grid of 2 sizes x 2 budgets x 2 variants (the example grid's), in
# array-task order.
ORDER = [
    f"{s}-{b}-{v}" for s in ("s1", "s2") for b in ("short", "long") for v in ("residual", "mhc")
]
# The runs the end-to-end test trains (the short ones locally, s1-long-residual as an array
# task) and the launch tests give finished logs; the others stay unfinished on purpose.
LOCAL = ["s1-short-residual", "s1-short-mhc", "s2-short-residual", "s2-short-mhc"]
ARRAY_TASK = "s1-long-residual"
FINISHED = [*LOCAL, ARRAY_TASK]

GOOD = """
recipe: tiny
variants: [residual, mhc]
sizes:
  s1: [--num-layers, 2]
budgets:
  short: [--train-iters, 20]
"""

# A finished run's log as Megatron-Core 0.19.2 prints it: the argument dump, iteration lines,
# the in-training evaluation, the final one on the validation set, then the test set's.
LOG = """
------------------------ arguments ------------------------
  global_batch_size ............................... 4
  rampup_batch_size ............................... None
  seq_length ...................................... 128
-------------------- end of arguments ---------------------
 [2026-11-23 22:05:51] iteration        5/      10 | consumed samples:           20 | lm loss: 5.8 |
 [2026-11-23 22:05:52] iteration       10/      10 | consumed samples:           40 | lm loss: 5.2 |
 validation loss at iteration 10 | lm loss value: 5.200000E+00 | lm loss PPL: 1.8E+02 |
 validation loss at iteration 10 on validation set | lm loss value: 5.151773E+00 | lm loss PPL: 1 |
 validation loss at iteration 10 on test set | lm loss value: 5.119886E+00 | lm loss PPL: 1 |
"""
UNFINISHED_LOG = LOG.split(" validation loss at iteration 10 on")[0]


def env(**extra) -> dict:
    """The test process's environment minus what would change the runs."""
    dropped = (
        "VARIANT", "TP", "PP", "EP", "TRAIN_ITERS", "NNODES", "MASTER_ADDR", "MASTER_PORT",
        "TRITON_INTERPRET",  # set by conftest.py for the kernel tests only
        "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_JOB_ID",
    )  # fmt: skip
    out = {k: v for k, v in os.environ.items() if k not in dropped}
    out["PYTHON"] = sys.executable
    out.update(extra)
    return out


def cli(*args, env_vars=None, timeout=600) -> subprocess.CompletedProcess:
    """Runs ``tools/scaling_sweep.py ARGS`` from the repository root, as a user would."""
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)],
        cwd=REPO_ROOT,
        env=env_vars or env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_rows(path) -> list[dict]:
    """The rows of a CSV."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def result_rows(points: dict[tuple[str, str, str], tuple[float, float]]) -> list[dict]:
    """results.csv rows: {(size, budget, variant): (compute, loss)}; NaN loss = unfinished."""
    out = []
    for (size, budget, variant), (compute, loss) in points.items():
        done = not math.isnan(loss)
        out.append(
            {
                "name": f"{size}-{budget}-{variant}",
                "size": size,
                "budget": budget,
                "variant": variant,
                "status": "finished" if done else "unfinished",
                "compute_flops": repr(compute) if done else "",
                "final_val_loss": repr(loss) if done else "",
            }
        )
    return out
