"""``benchmarks/device_check.sh``'s command line: an unknown argument is refused, naming the ones
it takes, before any stage starts. The ``--dry-run`` of every stage is in
``tests/e2e/test_device_check.py``."""

import subprocess

from tests.launching import REPO_ROOT


def test_unknown_argument_is_refused():
    proc = subprocess.run(
        ["benchmarks/device_check.sh", "--dryrun"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "unknown argument '--dryrun'" in proc.stderr
