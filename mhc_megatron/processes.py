"""Process helpers shared by the tools and tests that launch training: free ports and killing a
whole launch (run.sh, torchrun and every rank)."""

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
    """Kills ``proc`` (started with ``start_new_session=True``), its process group and every
    descendant: gloo ranks block forever when one rank dies, and they may sit in sessions of
    their own, so the process group alone does not reach them."""
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
