"""Every fused kernel compiles for Hopper (sm_90a) on the CPU, at training shapes.

``benchmarks/compile_sm90.py`` runs the kernels' real launch code with a stand-in Triton driver
(capability 9.0, 132 SMs) and compiles instead of launching; ptxas (bundled with Triton) reports
registers, spills and shared memory. It runs in a child process: this session's kernels are
defined for Triton's interpreter, which never compiles.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.launching import REPO_ROOT

pytest.importorskip("triton.backends.nvidia", reason="Triton without its CUDA backend")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm90") / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "benchmarks/compile_sm90.py", "--streams", "2", "4", "8",
         "--hidden", "1280", "2560", "4096", "7168", "--tokens", "4096", "16384", "32768",
         "--out", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_every_kernel_compiles_at_every_shape(report):
    kernels = {row["kernel"] for row in report["kernels"]}
    assert kernels == {
        "_fwd_kernel", "_bwd_coef_kernel", "_bwd_x_kernel", "_pre_fwd_kernel", "_pre_bwd_kernel",
        "_post_res_fwd_kernel", "_post_res_bwd_kernel", "_bwd_x_chain_kernel",
    }  # fmt: skip
    launched = {}
    for row in report["kernels"]:
        for shape in row["shapes"]:
            launched.setdefault(tuple(shape), []).append(row["kernel"])
    # 3 n x 4 C x 3 T, each with the fused site's 6 launches and the separate ops' 6, plus the
    # chained enter backward of two sites in a row where n <= 4 (kernels.chain.CHAIN_MAX_STREAMS):
    # dh_pre, coefficients, and the chained dx pass.
    assert len(launched) == 36
    for (n, _, _), names in launched.items():
        assert len(names) == (15 if n <= 4 else 12), (n, names)


def test_no_spills_and_shared_memory_within_the_limit(report):
    for row in report["kernels"]:
        where = f"{row['kernel']} {row['constants']}"
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, where
        assert row["shared"] + row["static_shared"] <= report["sm90_max_shared"], where
        assert 0 < row["registers"] <= 255, where


def test_coefficient_forward_takes_the_wgmma_path(report):
    forward = [row for row in report["kernels"] if row["kernel"] == "_fwd_kernel"]
    assert forward and all(row["mma"] == "wgmma" for row in forward), forward


def test_no_warp_repeats_another_warps_mma_work(report):
    """Each MMA's warps cover its accumulator tile exactly once (warps x instruction shape <=
    tile, along M and N): more warps than the tile needs would compute the same values twice."""
    tiles = [(row["kernel"], t) for row in report["kernels"] for t in row["mma_tiles"]]
    assert tiles and not [(k, t) for k, t in tiles if t["repeats"]]
