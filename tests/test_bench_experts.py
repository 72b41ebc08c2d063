"""CPU smoke test of ``benchmarks/bench_experts.py`` (in a child process: it enables CPU mode and
a process group of its own): the harness runs end to end and checks the two expert modules
against each other. CPU timings mean nothing and are not asserted."""

import json
import math
import os
import subprocess
import sys

from tests.launching import REPO_ROOT


def test_bench_experts_runs_and_checks_grouped_against_sequential(tmp_path):
    out = tmp_path / "experts.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_experts.py", "--device", "cpu", "--shapes", "3b",
         "--tokens", "8", "--iters", "1", "--warmup", "0", "--out", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["shapes"]
    assert (row["experts"], row["hidden"], row["ffn"], row["topk"]) == (64, 1280, 896, 6)
    assert row["grouped_path"]  # the grouped GEMM ran, not the fallback loop
    # fp32: the same products and sums (SequentialMLP's matmuls against grouped_mm).
    assert row["max_rel"] < 1e-5
    for impl in ("sequential", "grouped"):
        assert all(math.isfinite(v) and v > 0 for v in row["timings_ms"][impl].values())
