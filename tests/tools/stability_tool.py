"""``tools/stability_report.py``, a script outside the package, loaded once by file path as
``report_tool``; and ``cli``, which runs it as a command. Shared by the tool's quick tests
(``tests/tools/test_stability_report.py``) and its end-to-end ones
(``tests/e2e/test_stability.py``)."""

import importlib.util
import os
import subprocess
import sys

from tests.launching import REPO_ROOT

TOOL = REPO_ROOT / "tools" / "stability_report.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("stability_report", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report_tool = _load_tool()


def cli(*args, timeout=120):
    """Runs ``tools/stability_report.py ARGS`` in a child process; returns the completed process
    (text output captured)."""
    # One thread per process: the report's measure processes run side by side on few cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
