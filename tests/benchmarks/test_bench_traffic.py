"""The traffic meter (``benchmarks/traffic.py``) against hand-counted bytes, and what it shows
about the fused site (``benchmarks/bench_traffic.py``)."""

import pytest
import torch
import triton
import triton.language as tl

from benchmarks import bench_traffic
from benchmarks.traffic import TrafficMeter

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the meter reads Triton's interpreter, which a GPU run skips"
)


@triton.jit
def _twice_then_store(x_ptr, y_ptr, idx_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(x_ptr + offs, mask=mask, other=0.0)
    b = tl.load(x_ptr + offs, mask=mask, other=0.0)  # the same addresses again
    picked = tl.load(idx_ptr + offs % 4)  # 4 distinct int64 values, loaded by every lane
    tl.store(y_ptr + offs, (a + b + picked).to(tl.bfloat16), mask=mask)


def test_triton_launch_bytes_match_a_hand_count():
    n = 100  # 4 programs of 32 lanes; the last has 28 masked off
    x, idx = torch.randn(n), torch.arange(4)
    y = torch.empty(n, dtype=torch.bfloat16)
    with TrafficMeter() as meter, meter.phase("fwd"):
        _twice_then_store[(4,)](x, y, idx, n, BLOCK=32)
    (record,) = meter.records
    assert (record.kind, record.name, record.phase) == ("triton", "_twice_then_store", "fwd")
    # Unique: x once (100 fp32), the 4 int64 indices once; y's 100 bf16 once.
    assert record.loads == 100 * 4 + 4 * 8 and record.stores == 100 * 2
    # Every access: x twice, and 128 index loads (masks do not apply to them).
    assert record.issued_loads == 2 * 100 * 4 + 128 * 8 and record.issued_stores == 100 * 2
    assert record.tensors == {"x_ptr": [400, 0], "idx_ptr": [32, 0], "y_ptr": [0, 200]}
    # The kernel still ran (to 1 bf16 ulp: the interpreter truncates instead of rounding).
    torch.testing.assert_close(y.float(), 2 * x + idx.repeat(25), rtol=2**-7, atol=0)


def test_torch_op_bytes_match_a_hand_count():
    a, b = torch.ones(10, 4), torch.ones(4)
    with TrafficMeter() as meter:
        c = a + b  # reads 40 + 4 floats, writes 40
        c.add_(a)  # reads both, writes c
        c.zero_()  # writes only
        c.copy_(a.t().t())  # reads a, writes c (views move nothing)
        torch.empty(1000)  # allocates only
        a.expand(3, 10, 4).sum()  # a broadcast view reads its 40 floats once
    moved = [(r.name, r.loads, r.stores) for r in meter.records]
    assert moved == [
        ("add", 176, 160), ("add_", 320, 160), ("zero_", 0, 160), ("copy_", 160, 160),
        ("sum", 160, 4),
    ]  # fmt: skip


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
