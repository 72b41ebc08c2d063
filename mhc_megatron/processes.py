"""Process helpers shared by the tools, tests, benchmarks and example scripts.

Free ports (also for shell scripts: ``python mhc_megatron/processes.py free-port``, stdlib and
psutil only, no install needed), a one-rank process group for tools that build a model in one
process, killing a whole launch (run.sh, torchrun and every rank), and a quick exit for processes
that loaded torch and Megatron.
"""

import gc
import os
import signal
import socket
import subprocess
import sys

import psutil


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def skip_final_collection() -> None:
    """Spare a process that is about to exit its last garbage collection.

    At exit the interpreter collects every object of the ~3,000 modules torch and Megatron load,
    for nothing: skipping it, such a process starts and exits in 0.78x the time
    (``benchmarks/bench_startup.py``). Frozen objects are left to the exit; refcounts still free
    them. Call it last: what must be written (checkpoints, TensorBoard events, logs) must be
    flushed by then.
    """
    gc.freeze()


def init_single_rank(backend: str = "gloo") -> bool:
    """A one-rank process group and Megatron's model-parallel state, everything of size 1.

    For tools, benchmarks and tests that build a model in one process without ``pretrain()``.
    The rendezvous is a free port of this process's own (never an inherited MASTER_PORT, which
    a parent test session or torchrun may still be listening on).

    Args:
        backend: ``gloo`` (CPU) or ``nccl`` (one GPU).

    Returns:
        Whether the process group was created here (the caller destroys it then).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    created = not dist.is_initialized()
    if created:
        init_method = f"tcp://127.0.0.1:{free_port()}"
        dist.init_process_group(backend, init_method=init_method, rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    return created


def kill_tree(proc: subprocess.Popen) -> None:
    """Kills ``proc`` (started with ``start_new_session=True``), its process group and descendants.

    Every descendant: gloo ranks block forever when one rank dies, and they may sit in sessions
    of their own, so the process group alone does not reach them.
    """
    try:
        victims = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        victims = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for victim in victims:
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            pass


def wait_or_kill(proc: subprocess.Popen, timeout_s: float | None) -> int | None:
    """Waits for ``proc``; returns its exit code, or None when ``timeout_s`` ran out.

    Unless it exited 0 (a timeout, a failure, or an exception such as KeyboardInterrupt while
    waiting), the whole tree is killed and reaped: ranks left behind by a failed launch spin on.
    """
    rc = None
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if rc != 0:
            kill_tree(proc)
            proc.wait()
    return rc


if __name__ == "__main__":
    # Shell scripts pick their rendezvous port with: python mhc_megatron/processes.py free-port
    if sys.argv[1:] != ["free-port"]:
        sys.exit("usage: python mhc_megatron/processes.py free-port")
    print(free_port())
