"""The traffic meter (``benchmarks/traffic.py``) against hand-counted bytes: one Triton launch in
the interpreter (unique and issued loads and stores, per pointer argument) and a few torch ops.
What the meter shows about the fused site is in ``tests/benchmarks/test_bench_traffic.py``."""

import pytest
import torch
import triton
import triton.language as tl

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
