"""``benchmarks/device_check.sh --dry-run``: the prepared GPU check, end to end on the CPU.

The same script the GPU machine runs, on tiny shapes without timing: every stage must pass and
the summary must hold what a closing note quotes (the site's ratios and correctness, the step
configs, both training runs' losses). Its refusal of an unknown argument is in
``tests/e2e/test_device_check_arguments.py``.
"""

import json
import math
import subprocess

from tests.launching import REPO_ROOT, child_env


def test_dry_run_passes_every_stage(tmp_path):
    env = child_env(OUT=str(tmp_path))
    proc = subprocess.run(
        ["benchmarks/device_check.sh", "--dry-run"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "device_check.json").read_text())
    # At most 8 files come back from the device machine.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "device_check.json", "environment.json", "experts.json", "logs.tar.gz", "mhc_site.json",
        "mhc_site_compile.json", "stages.jsonl", "step.json",
    ]  # fmt: skip
    assert summary["dry_run"] is True
    stages = {s["stage"]: s["rc"] for s in summary["stages"]}
    assert stages == dict.fromkeys(
        (
            "kernel_tests",
            "mhc_site",
            "mhc_site_compile",
            "step",
            "experts",
            "pretrain_mhc",
            "pretrain_residual",
        ),
        0,
    )
    (site,) = summary["mhc_site"]
    # The fused kernels ran (in the interpreter) and matched eager; Liger is CUDA-only.
    assert site["worst_rel"]["ours"] < 5e-2 and "ours/eager" in site["site_fwd_bwd"]
    assert summary["step"]["configs"]["mhc_triton"]["available"] is True
    # bench_experts: the grouped GEMM ran and matched SequentialMLP (fp32: the same products
    # and sums), and both were timed.
    (experts,) = summary["experts"]
    assert experts["grouped_path"] and experts["max_rel"] < 1e-5
    ratios = experts["grouped/sequential"]
    assert set(ratios) == {"fwd", "bwd", "fwd_bwd"}
    assert all(math.isfinite(r) and r > 0 for r in ratios.values())
    for variant in ("mhc", "residual"):
        run = summary["pretrain"][variant]
        assert run["steps"] == 2 and all(0 < loss < 20 for loss in run["losses"]), run
