"""Process helpers shared by the tools and tests that launch training.

Free ports, and killing a whole launch (run.sh, torchrun and every rank).
"""

import os
import signal
import socket
import subprocess

import psutil


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
