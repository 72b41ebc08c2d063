"""CPU smoke test of ``benchmarks/bench_mhc_site.py``: the harness runs end to end on tiny shapes
and writes the JSON it promises. No timing is asserted: CPU numbers mean nothing (the Triton
kernels run in Triton's interpreter here, see ``tests/conftest.py``)."""

import importlib
import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_mhc_site.py"
N, C, T = 4, 32, 64


def _ours_importable() -> bool:
    try:
        for module in ("coefficients", "pre", "post_res"):
            importlib.import_module(f"mhc_megatron.kernels.{module}")
    except Exception:
        return False
    return True


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_mhc_site", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory):
    """One tiny CPU run (liger is CUDA-only, so it must come back unavailable)."""
    out = tmp_path_factory.mktemp("bench") / "result.json"
    argv = ["--device", "cpu", "--streams", str(N), "--hidden", str(C), "--tokens", str(T)]
    argv += ["--iters", "1", "--warmup", "0", "--impls", "ours,eager,liger,residual"]
    returned = bench.main([*argv, "--out", str(out)])
    return returned, json.loads(out.read_text())


def _positive_finite(value) -> bool:
    return isinstance(value, float | int) and math.isfinite(value) and value > 0


def test_json_layout(run):
    returned, result = run
    assert result == json.loads(json.dumps(returned))  # what main() returns is what it wrote
    assert {"meta", "bandwidth", "floor_definition", "impls", "shapes"} <= result.keys()
    assert result["meta"]["device_name"] == "cpu" and result["meta"]["versions"]["torch"]
    assert {"timing", "backward", "correctness"} <= result["meta"]["method"].keys()
    assert _positive_finite(result["bandwidth"]["GBps"])
    assert "(6n+5)*T*C*elem" in result["floor_definition"]["site"]
    (shape,) = result["shapes"]
    assert (shape["n"], shape["C"], shape["T"], shape["dtype"]) == (N, C, T, "bf16")
    for key in ("floor_bytes", "floor_ms", "timings_ms", "first_call_s", "correctness", "ratios"):
        assert key in shape


def test_floor_bytes_follow_the_formula(run):
    (shape,) = run[1]["shapes"]
    floors, S = shape["floor_bytes"], T * C * 2  # bf16 streams: 2 bytes per element
    assert floors["site"]["fwd_bwd"] == (6 * N + 5) * T * C * 2  # the project's definition
    # pre: fwd reads x and h_pre (fp32) and writes u; bwd reads grad_u, x and h_pre and writes
    # grad_x and grad_h_pre.
    assert floors["pre"]["fwd"] == (N + 1) * S + T * N * 4
    assert floors["pre"]["bwd"] == (2 * N + 1) * S + 2 * T * N * 4
    for target, modes in floors.items():
        assert modes["fwd"] + modes["bwd"] == modes["fwd_bwd"], target
        for mode, nbytes in modes.items():
            ms = nbytes / run[1]["bandwidth"]["GBps"] / 1e6
            assert shape["floor_ms"][target][mode] == pytest.approx(ms)


def test_timings_and_ratios(run):
    result = run[1]
    (shape,) = result["shapes"]
    assert shape["errors"] == {}
    timings, ratios = shape["timings_ms"], shape["ratios"]
    assert set(timings["residual"]) == {"site"}
    expected = {"eager/floor", "site/residual"}
    if result["impls"]["ours"]["available"]:
        expected |= {"ours/floor", "ours/eager", "row/(2*site)"}
    assert expected <= ratios.keys()
    for impl, targets in timings.items():
        for target, modes in targets.items():
            assert modes.keys() == {"fwd", "bwd", "fwd_bwd"}, (impl, target)
            assert all(_positive_finite(v) for v in modes.values()), (impl, target, modes)
    for name, rows in ratios.items():
        for row, modes in rows.items():
            assert modes and all(_positive_finite(v) for v in modes.values()), (name, row)
    assert set(ratios["eager/floor"]) == {"coefficients", "pre", "post_res", "site"}
    assert set(timings["eager"]) == set(ratios["eager/floor"])  # the row is ours alone


def test_unavailable_implementations_say_why(run):
    impls = run[1]["impls"]
    assert impls["eager"] == {"available": True} and impls["residual"] == {"available": True}
    assert not impls["liger"]["available"] and "CUDA-only" in impls["liger"]["reason"]
    (shape,) = run[1]["shapes"]
    if _ours_importable():
        assert impls["ours"] == {"available": True}
        assert set(shape["timings_ms"]["ours"]) == {
            "coefficients", "pre", "post_res", "site", "row"
        }  # fmt: skip
        # The numerics check ran on every target; its tolerance is the harness's business, but a
        # NaN or a missing grad would mean the check itself is broken.
        for target, report in shape["correctness"]["ours"].items():
            assert "missing" not in report and math.isfinite(report["worst_rel"]), target
    else:
        assert not impls["ours"]["available"]
        assert impls["ours"]["reason"].startswith("unavailable: ")
        assert "ours" not in shape["timings_ms"]
