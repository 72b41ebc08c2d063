"""Launching training scripts under torchrun from tests, with hard timeouts.

gloo ranks block forever when one rank dies, and killing torchrun alone leaves them spinning:
each launch runs in its own session and the whole process group is killed when it fails.
"""

import os
import subprocess
import sys
from pathlib import Path

from mhc_megatron import megatron_log
from mhc_megatron.processes import free_port, wait_or_kill

REPO_ROOT = Path(__file__).resolve().parents[1]
# --cpu (it implies the local modules and no GPU fusions: mhc_megatron/training/cpu_settings.py)
# plus --disable-bias-linear, which MoE needs on CPU (the expert bias+GeLU fusion is refused).
CPU_LOCAL_FLAGS = ["--cpu", "--disable-bias-linear"]
# A 2-layer MoE mHC model small enough for a few CPU steps per second (data and batch flags are
# the caller's).
TINY_MOE = [
    *CPU_LOCAL_FLAGS,
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "64", "--max-position-embeddings", "64", "--position-embedding-type", "rope",
    "--normalization", "RMSNorm", "--swiglu",
    "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "64",
    "--moe-layer-freq", "[0,1]", "--moe-token-dispatcher-type", "alltoall",
    "--hidden-dropout", "0", "--attention-dropout", "0",
    "--micro-batch-size", "4", "--lr", "3e-3", "--lr-decay-style", "constant",
    "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "0",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "257", "--seed", "1234",
]  # fmt: skip


def start(script: Path, nproc: int, args: list[str], out) -> subprocess.Popen:
    """Starts ``script`` on ``nproc`` ranks in a session of its own, output to the file ``out``.

    Several ranks run under torchrun. One rank runs as a plain process with the variables
    torchrun would set (RANK, WORLD_SIZE, MASTER_PORT, ...): the same ``pretrain()`` path, less
    torchrun's own start-up (about 2 s of a launch here); the example scripts' torchrun launches
    are tested as they are (tests/e2e/test_pretrain_mhc.py, test_slurm.py).
    """
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    port = str(free_port())
    if nproc == 1:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                   GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
        cmd = [sys.executable, "-u", str(script), *args]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1",
            "--master-port", port,
            str(script), *args,
        ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # fmt: skip


def launch(
    script: Path, nproc: int, args: list[str], log: Path, timeout_s: int = 240
) -> tuple[int | None, str]:
    """Runs ``script`` on ``nproc`` ranks (:func:`start`); returns ``(exit code or None on
    timeout, output)``."""
    with open(log, "w") as out:
        rc = wait_or_kill(start(script, nproc, args, out), timeout_s)
    return rc, log.read_text()


def child_env(**overrides: str) -> dict[str, str]:
    """The environment for a script that launches training (examples/*.sh) from a test.

    Without TRITON_INTERPRET (conftest.py sets it for the kernel tests) and without MASTER_ADDR /
    MASTER_PORT: a rendezvous the test session inherited (a torchrun or SLURM job around it) may
    still be listening there, and a script that honours MASTER_PORT would rendezvous on that
    port and fail with EADDRINUSE (seen twice, when the in-process tests still set them).
    """
    dropped = ("TRITON_INTERPRET", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    # One thread per rank unless the session says otherwise: the examples default to a thread
    # per core, and two test workers' ranks on those cores would spin against each other.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env | overrides


losses = megatron_log.losses  # {iteration: lm loss} of a launch's log


def step_losses(text: str) -> dict[int, float]:
    """``{iteration: lm loss of that iteration alone}`` from a launch logged with
    ``--log-interval 1``.

    Megatron 0.19.2 logs the first iteration of a process without resetting its accumulators
    (``training.py:2594``), so the line after it prints the mean of both: undone here.
    """
    logged = losses(text)
    if len(logged) >= 2:
        first = min(logged)
        logged[first + 1] = 2 * logged[first + 1] - logged[first]
    return logged
