"""Fused pre-mix and post + residual mix kernels against the plain-PyTorch reference.

Every output and every gradient is compared with ``mhc_megatron.ops`` run in float64 on the same
(upcast, hence exact) inputs, and with the reference run in the streams' own dtype. Without a GPU
the kernels run in Triton's interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``), so
shapes are kept small; the same tests run unchanged on a GPU.
"""

import inspect
import re

import pytest
import torch

from mhc_megatron import ops
from mhc_megatron.kernels import post_res as post_res_kernels
from mhc_megatron.kernels import pre as pre_kernels
from mhc_megatron.kernels.post_res import mhc_post_res
from mhc_megatron.kernels.pre import mhc_pre

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (rtol, atol) against the float64 reference, for unit-scale data. "stream": u, x_next, dx, dy
# (stored in the streams' dtype); "coef": dh_pre, dh_post, dh_res (always fp32).
TOLERANCES = {
    torch.float32: {
        # fp32 sums of n <= 8 products; only the summation order differs from torch.
        "stream": (1e-5, 1e-5),
        # fp32 sums over C <= 100 products of size ~1, chunked in a different order than torch.
        "coef": (1e-5, 1e-4),
    },
    torch.bfloat16: {
        # One rounding to bf16 at the store: within 1 bf16 ulp, at most 2^-7 of the value. The
        # interpreter truncates fp32 -> bf16 instead of rounding to nearest even, so a full ulp
        # (not half) is needed; atol covers fp32 accumulation error where the sum cancels to ~0.
        "stream": (2**-7, 1e-5),
        # bf16 inputs are exact in fp32 and fp64; only fp32 accumulation over C differs.
        "coef": (1e-5, 1e-4),
    },
    torch.float16: {
        # One rounding to fp16 at the store: within 1 fp16 ulp (2^-10 of the value), see bf16.
        "stream": (2**-10, 1e-5),
        "coef": (1e-5, 1e-4),  # as bf16
    },
}


def _randn(shape, seed: int, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    """Seeded on the CPU, then moved, so that CPU and GPU runs see the same numbers."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype).to(DEVICE)


def _run(fn, inputs, grad_out, dtype=None):
    """``fn(*inputs)`` and the gradients of every input, optionally run in ``dtype``."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def _assert_matches(name, actual, expected, tol, scale=1.0):
    rtol, atol = tol
    torch.testing.assert_close(
        actual.double(),
        expected.double(),
        rtol=rtol,
        atol=atol * scale,
        msg=lambda m: f"{name}: {m}",
    )


PRE_NAMES = ("u", "dx", "dh_pre")  # output, then the gradient of each input
POST_RES_NAMES = ("x_next", "dx", "dy", "dh_post", "dh_res")


def _check(fused, reference, inputs, grad_out, stream_dtype, scale=1.0):
    """Fused op vs the float64 reference (ground truth) and vs the reference in stream_dtype."""
    names = PRE_NAMES if fused is mhc_pre else POST_RES_NAMES
    tol = TOLERANCES[stream_dtype]
    out, grads = _run(fused, inputs, grad_out)
    assert out.dtype == stream_dtype
    for grad, t in zip(grads, inputs, strict=True):
        assert grad.dtype == t.dtype and grad.shape == t.shape
    for expected_run in (
        _run(reference, inputs, grad_out, torch.float64),
        _run(reference, inputs, grad_out),
    ):
        expected = [expected_run[0], *expected_run[1]]
        for name, a, e in zip(names, [out, *grads], expected, strict=True):
            kind = "coef" if name.startswith("dh_") else "stream"
            _assert_matches(name, a, e, tol[kind], scale)
    return out, grads


def _pre_inputs(lead, n, C, dtype, seed, scale=1.0):
    x = _randn((*lead, n, C), seed, dtype, scale)
    h_pre = _randn((*lead, n), seed + 1)
    du = _randn((*lead, C), seed + 2, dtype)
    return (x, h_pre), du


def _post_res_inputs(lead, n, C, dtype, seed, scale=1.0):
    x = _randn((*lead, n, C), seed, dtype, scale)
    y = _randn((*lead, C), seed + 1, dtype, scale)
    h_post = _randn((*lead, n), seed + 2)
    h_res = _randn((*lead, n, n), seed + 3)
    dout = _randn((*lead, n, C), seed + 4, dtype)
    return (x, y, h_post, h_res), dout


# (leading dims, n, C): C never a power of two, token counts odd, [s, b] leading dims, n = 3 for
# the padding of n to a power of two.
SHAPES = [((5,), 1, 24), ((3, 2), 2, 40), ((3, 5), 4, 100), ((7,), 8, 40), ((2, 3), 3, 24)]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,n,C", SHAPES)
def test_pre_matches_reference(lead, n, C, dtype):
    inputs, du = _pre_inputs(lead, n, C, dtype, seed=100 * n + C)
    _check(mhc_pre, ops.mhc_pre, inputs, du, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,n,C", SHAPES)
def test_post_res_matches_reference(lead, n, C, dtype):
    inputs, dout = _post_res_inputs(lead, n, C, dtype, seed=100 * n + C)
    _check(mhc_post_res, ops.mhc_post_res, inputs, dout, dtype)


def test_float16_streams():
    inputs, du = _pre_inputs((9,), 4, 40, torch.float16, seed=7)
    _check(mhc_pre, ops.mhc_pre, inputs, du, torch.float16)
    inputs, dout = _post_res_inputs((9,), 4, 40, torch.float16, seed=8)
    _check(mhc_post_res, ops.mhc_post_res, inputs, dout, torch.float16)


@pytest.mark.parametrize("n", [3, 8])
def test_many_c_chunks(monkeypatch, n):
    """Small tiles force several C blocks in the forward grid and several C chunks (the last one
    partial) in the backward loop, as large C does with the default tiles."""
    for module in (pre_kernels, post_res_kernels):
        monkeypatch.setattr(module, "_FWD_TILE", 64)
        monkeypatch.setattr(module, "_BWD_TILE", 64)
    dtype = torch.bfloat16
    inputs, du = _pre_inputs((5,), n, 100, dtype, seed=11)
    _check(mhc_pre, ops.mhc_pre, inputs, du, dtype)
    inputs, dout = _post_res_inputs((5,), n, 100, dtype, seed=12)
    _check(mhc_post_res, ops.mhc_post_res, inputs, dout, dtype)


def test_non_contiguous_inputs():
    n, C = 4, 24
    x = _randn((n, 6, C), 21).transpose(0, 1)  # [T, n, C] view with stride(1) != C
    h_pre = _randn((n, 6), 22).t()
    assert not x.is_contiguous() and not h_pre.is_contiguous()
    _check(mhc_pre, ops.mhc_pre, (x, h_pre), _randn((6, C), 23), torch.float32)
    y = _randn((6, 2 * C), 24)[:, ::2]
    h_res = _randn((6, n, n), 25).transpose(1, 2)
    inputs = (x, y, _randn((6, n), 26), h_res)
    _check(mhc_post_res, ops.mhc_post_res, inputs, _randn((6, n, C), 27), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_rows(dtype):
    n, C = 4, 40
    inputs, du = _pre_inputs((6,), n, C, dtype, seed=31)
    x = inputs[0].clone()
    x[:, 1] = 0  # one stream zero in every token
    x[2] = 0  # one token all zero
    _, (_, dh_pre) = _check(mhc_pre, ops.mhc_pre, (x, inputs[1]), du, dtype)
    assert torch.all(dh_pre[:, 1] == 0) and torch.all(dh_pre[2] == 0)

    (_, y, h_post, h_res), dout = _post_res_inputs((6,), n, C, dtype, seed=32)
    y = y.clone()
    y[3] = 0
    _, grads = _check(mhc_post_res, ops.mhc_post_res, (x, y, h_post, h_res), dout, dtype)
    assert torch.all(grads[3][:, :, 1] == 0) and torch.all(grads[3][2] == 0)  # dh_res[:, j=1]
    assert torch.all(grads[2][3] == 0)  # dh_post of the token whose y is zero


def test_large_values_bf16():
    """1e4-sized streams: the fp32 accumulation (not bf16) keeps the relative error at 1 ulp."""
    scale = 1e4
    inputs, du = _pre_inputs((7,), 4, 40, torch.bfloat16, seed=41, scale=scale)
    _check(mhc_pre, ops.mhc_pre, inputs, du, torch.bfloat16, scale=scale)
    inputs, dout = _post_res_inputs((7,), 4, 40, torch.bfloat16, seed=42, scale=scale)
    out, _ = _check(mhc_post_res, ops.mhc_post_res, inputs, dout, torch.bfloat16, scale=scale)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_identity_mix_is_exact(dtype):
    """h_res = I and h_post = 0 give x back bit for bit (and dx = dout, dy = 0); a one-hot h_pre
    picks one stream exactly."""
    T, n, C = 5, 4, 40
    x = _randn((T, n, C), 51, dtype)
    y = _randn((T, C), 52, dtype)
    h_res = torch.eye(n, device=DEVICE).expand(T, n, n)
    h_post = torch.zeros(T, n, device=DEVICE)
    dout = _randn((T, n, C), 53, dtype)
    out, (dx, dy, _, _) = _run(mhc_post_res, (x, y, h_post, h_res), dout)
    assert torch.equal(out, x)
    assert torch.equal(dx, dout)
    assert torch.all(dy == 0)

    h_pre = torch.zeros(T, n, device=DEVICE)
    h_pre[:, 2] = 1
    du = _randn((T, C), 54, dtype)
    u, (dx, _) = _run(mhc_pre, (x, h_pre), du)
    assert torch.equal(u, x[:, 2])
    assert torch.equal(dx[:, 2], du) and torch.all(dx[:, [0, 1, 3]] == 0)


def test_empty_token_dim():
    x = torch.zeros(0, 4, 24, device=DEVICE, requires_grad=True)
    h_pre = torch.zeros(0, 4, device=DEVICE, requires_grad=True)
    u = mhc_pre(x, h_pre)
    u.sum().backward()
    assert u.shape == (0, 24) and x.grad.shape == x.shape
    out = mhc_post_res(
        x, torch.zeros(0, 24, device=DEVICE), h_pre, torch.zeros(0, 4, 4, device=DEVICE)
    )
    assert out.shape == x.shape


def _bad_calls():
    x = torch.zeros(3, 4, 8, device=DEVICE)
    y = torch.zeros(3, 8, device=DEVICE)
    hp, hr = torch.zeros(3, 4, device=DEVICE), torch.zeros(3, 4, 4, device=DEVICE)
    x16 = torch.zeros(3, 16, 8, device=DEVICE)
    too_many = re.escape(
        "mhc_num_streams=16 is not supported by the fused kernels (n <= 8); use --mhc-backend torch"
    )
    return [
        (lambda: mhc_pre(x16, torch.zeros(3, 16, device=DEVICE)), too_many),
        (lambda: mhc_post_res(x16, y, torch.zeros(3, 16), torch.zeros(3, 16, 16)), too_many),
        (lambda: mhc_pre(x, torch.zeros(3, 5, device=DEVICE)), r"h_pre must be x\.shape\[:-1\]"),
        (lambda: mhc_pre(x, hp[0]), "no broadcasting"),
        (lambda: mhc_pre(x[0, 0], hp), r"x must be \[\.\.\., n, C\]"),
        (lambda: mhc_pre(x.double(), hp), "x.dtype=torch.float64 is not supported"),
        (lambda: mhc_post_res(x, y[:, :7], hp, hr), r"y must have shape \(3, 8\)"),
        (lambda: mhc_post_res(x, y, hp[:, :3], hr), r"h_post must have shape \(3, 4\)"),
        (lambda: mhc_post_res(x, y, hp, hr[:, :, :3]), r"h_res must have shape \(3, 4, 4\)"),
        (lambda: mhc_post_res(x, y, hp, hr.double()), "h_res.dtype=torch.float64"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_inputs_raise(case):
    call, message = _bad_calls()[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_signatures_match_reference():
    assert inspect.signature(mhc_pre) == inspect.signature(ops.mhc_pre)
    assert inspect.signature(mhc_post_res) == inspect.signature(ops.mhc_post_res)
