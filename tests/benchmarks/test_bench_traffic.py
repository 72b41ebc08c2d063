"""What the traffic meter (``benchmarks/traffic.py``) shows about the fused site
(``benchmarks/bench_traffic.py``): a single site against the separate ops, and two chained sites.
The meter's own hand-counted checks are in ``tests/benchmarks/test_traffic_meter.py``."""

import pytest
import torch

from benchmarks import bench_traffic

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the meter reads Triton's interpreter, which a GPU run skips"
)


def test_fused_site_moves_less_than_the_separate_ops():
    """At a small shape (C = 256): the fused site writes dx once and reads x at most twice in
    forward; the separate ops pay autograd's adds of three dx."""
    result = bench_traffic.bench(4, 256, (32, 64), ["separate", "fused"], layer=False)
    separate, fused = (result["site"][k] for k in ("separate", "fused"))
    assert fused["totals"]["total_S"] < separate["totals"]["total_S"] - 25
    backward = [r for r in fused["records"] if r["phase"] == "bwd"]
    assert not [r for r in backward if r["kind"] == "torch" and r["name"] == "add"]
    stream_writes = [r["name"] for r in backward if r["stores_S"] >= 3.9]  # a [T, n, C] store
    assert stream_writes == ["_bwd_x_kernel"]
    forward_x = sum(
        r["tensors_S"].get("x_ptr", [0, 0])[0] for r in fused["records"] if r["phase"] == "fwd"
    )
    assert forward_x == pytest.approx(8.0, abs=0.01)  # n = 4: x read twice
    assert fused["totals"]["floor_S"] == 29


def test_chained_sites_skip_a_pass_over_the_streams():
    """Two sites in a row (C = 256): the second's dx pass, chained with the first's exit
    backward, reads x_A, y_A, du and dout once and writes dx and dy once; neither x_B nor dx_B
    is read back, which saves ~6.7 S a pair ((4n + 1) S less site A's partials)."""
    result = bench_traffic.bench(4, 256, (32, 64), ["fused"], model_sites=0)
    single = result["site"]["fused"]["totals"]["total_S"]
    layer = result["layer"]
    assert layer["per_site"]["total_S"] < single - 3.0  # per site: half the pair's saving
    chained = [r for r in layer["records"] if r["name"] == "_bwd_x_chain_kernel"]
    assert len(chained) == 1
    tensors = chained[0]["tensors_S"]
    loads = {k: v[0] for k, v in tensors.items() if v[0] >= 0.5}
    stores = {k: v[1] for k, v in tensors.items() if v[1] >= 0.5}
    assert loads == pytest.approx({"xa_ptr": 4.0, "ya_ptr": 1.0, "du_ptr": 1.0, "dout_ptr": 4.0})
    assert stores == pytest.approx({"dx_ptr": 4.0, "dy_a_ptr": 1.0, "part_res_ptr": 0.5})
    # The first site's exit backward ran inside the chained pass: one _post_res_bwd_kernel (the
    # second site's exit) in the whole backward.
    names = [r["name"] for r in layer["records"] if r["phase"] == "bwd"]
    assert names.count("_post_res_bwd_kernel") == 1
