"""One run per output directory: an exclusive ``flock`` on ``<save>/mhc_run.lock``.

:class:`RunLock` is held by rank 0 for the life of the run; a second run on the same directory
is refused with the first one's host and pid. The lock goes with the process (a killed run
leaves nothing to clean up).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from mhc_megatron.training.run_check_error import RunCheckError

LOCK_NAME = "mhc_run.lock"


class RunLock:
    """An exclusive lock on ``<directory>/mhc_run.lock`` for the life of this process.

    Args:
        directory: the run's ``--save`` directory (created if missing).
    """

    def __init__(self, directory: str):
        self.path = Path(directory) / LOCK_NAME
        self._file = None

    def acquire(self) -> None:
        """Takes the lock or raises RunCheckError naming the run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the life of the run
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunCheckError(
                f"another run is using --save {self.path.parent} ({holder}). Two runs on one "
                "directory overwrite each other's checkpoints: wait for it to end, stop it, or "
                "pass another --save."
            ) from None
        except OSError as error:  # a file system without flock: warn, do not block the run
            print(f"warning: cannot lock {self.path} ({error}); two runs could share --save")
            self._file = handle
            return
        handle.seek(0)
        handle.truncate()
        handle.write(
            f"host {socket.gethostname()}, pid {os.getpid()}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        )
        handle.flush()
        self._file = handle

    def release(self) -> None:
        """Drops the lock (it also goes when the process ends)."""
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
