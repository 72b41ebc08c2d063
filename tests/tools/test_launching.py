"""The test launcher leaves no rank behind when a launch times out (gloo ranks never exit on
their own once a peer is gone)."""

import psutil

from tests.launching import launch


def test_timed_out_launch_kills_every_rank(tmp_path):
    script = tmp_path / "sleeper.py"
    script.write_text("import time\ntime.sleep(600)\n")
    rc, _ = launch(script, 2, [], tmp_path / "log", timeout_s=10)
    assert rc is None
    left = [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(script) in " ".join(p.info["cmdline"] or [])
    ]
    assert not left
