"""benchmarks/bench_recompute.py runs on CPU and reports what it promises (no timing asserted)."""

import json
import os
import subprocess
import sys

from tests.launching import REPO_ROOT


def test_bench_recompute_cpu_smoke(tmp_path):
    out = tmp_path / "recompute.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_recompute.py"), "--device", "cpu",
         "--layers", "3", "--hidden", "64", "--seq", "32", "--iters", "1", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"residual", "mhc", "mhc_recompute"}
    saved = {name: r["saved_bytes"] for name, r in report["results"].items()}
    assert saved["mhc_recompute"] < saved["mhc"]
    ratio = report["ratios"]["saved_bytes mhc_recompute/residual"]
    assert ratio == saved["mhc_recompute"] / saved["residual"]
    assert all(r["step_ms"] > 0 for r in report["results"].values())
