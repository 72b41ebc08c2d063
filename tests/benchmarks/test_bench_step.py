"""CPU smoke test of ``benchmarks/bench_step.py``: whole Megatron training steps of the three
configs on a tiny MoE model, end to end, and the JSON it promises. No timing is asserted: CPU
numbers mean nothing (the Triton kernels run in Triton's interpreter)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mhc_megatron.processes import free_port

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_step.py"
# Tiny shape, given explicitly so the parameter count below does not depend on the presets.
L, C, HEADS, E, K, SHARED, FFN, S, B, V, N = 2, 64, 4, 8, 2, 2, 32, 16, 2, 128, 4
ARGS = dict(layers=L, hidden=C, heads=HEADS, experts=E, topk=K, shared=SHARED, moe_ffn=FFN)
ARGS |= dict(seq=S, batch=B, vocab=V, streams=N, iters=1, warmup=0, site_iters=1, gemm=128)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    """One run in a subprocess: its process group and CPU mode stay out of this process."""
    out = tmp_path_factory.mktemp("bench_step") / "step.json"
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in ARGS.items()]
    cmd = [sys.executable, str(BENCH), "--device", "cpu", *argv, "--out", str(out)]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mHC share" in proc.stdout  # the readable table was printed
    return json.loads(out.read_text())


def _positive_finite(value) -> bool:
    return isinstance(value, float | int) and math.isfinite(value) and value > 0


def test_json_layout(result):
    expected = {"meta", "model", "gemm", "bandwidth", "configs", "sites", "ratios"}
    expected |= {"active_params", "mfu40_step_ms", "shares", "measured_step_overhead", "goal"}
    assert expected <= result.keys()
    assert result["meta"]["device_name"] == "cpu" and result["meta"]["triton_interpret"] == "1"
    assert result["model"]["tokens"] == S * B and result["model"]["moe_layer_freq"] == [1] * L
    assert _positive_finite(result["gemm"]["TFLOPs"])
    assert _positive_finite(result["bandwidth"]["GBps"])


def test_all_three_configs_trained(result):
    configs = result["configs"]
    assert set(configs) == {"residual", "mhc_torch", "mhc_triton"}
    for name, run in configs.items():
        if name == "mhc_triton" and not run["available"]:
            assert run["reason"].startswith("unavailable: ")
            pytest.fail(f"the kernels should run in Triton's interpreter: {run['reason']}")
        assert run["available"], (name, run)
        assert len(run["step_samples_ms"]) == ARGS["iters"]
        assert all(math.isfinite(loss) for loss in run["loss_first_last"]), name
    # Same seed and tokens: both mHC backends build the same model and see the same first loss.
    first = [configs[n]["loss_first_last"][0] for n in ("mhc_torch", "mhc_triton")]
    assert first[0] == pytest.approx(first[1], rel=1e-2)


def test_ratios_and_shares(result):
    step = result["ratios"]["step_time"]
    assert set(step) == {"mhc_torch/residual", "mhc_triton/residual"}
    for table in result["ratios"].values():  # peak memory: CUDA only, so empty here
        assert all(_positive_finite(v) for v in table.values()), table
    assert set(result["shares"]) == {"fused", "eager", "floor"}
    for key, share in result["shares"].items():
        for field in ("ms_per_step", "vs_decoder", "vs_model"):
            assert _positive_finite(share[field]), (key, field)
        assert share["vs_decoder"] > share["vs_model"]  # the output layer adds to the step
    assert result["goal"]["value"] == result["shares"]["fused"]["vs_decoder"]


def test_active_params_and_floor_follow_the_formulas(result):
    active, sites = result["active_params"], result["sites"]
    attention = 4 * C * C  # QKV (3 C x C, as many KV as Q heads) and the output projection
    expert = 3 * C * FFN  # gated FFN: fc1 is [2 * ffn, C], fc2 [C, ffn]
    shared = 3 * C * SHARED * FFN
    layer = attention + 2 * C + E * C + shared + expert * K  # norms, router, active experts
    assert active["decoder"] == L * layer + C  # + the final norm
    assert active["output_layer"] == V * C and active["model"] == active["decoder"] + V * C
    assert active["routed_total"] == L * E * expert and active["mhc_params_excluded"] > 0
    tokens = S * B
    t40 = 6 * active["decoder"] * tokens / (0.4 * result["gemm"]["TFLOPs"] * 1e12) * 1e3
    assert result["mfu40_step_ms"]["decoder"] == pytest.approx(t40)
    assert sites["count"] == 2 * L
    assert sites["floor_bytes_per_site"] == (6 * N + 5) * tokens * C * 2
    floor = sites["floor_bytes_per_site"] * 2 * L / result["bandwidth"]["GBps"] / 1e6
    assert result["shares"]["floor"]["ms_per_step"] == pytest.approx(floor)
    fused = sites["fused"]["site_ms"] * 2 * L
    assert result["shares"]["fused"]["vs_decoder"] == pytest.approx(fused / t40)
