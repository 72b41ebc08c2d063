"""The fused mHC-coefficients kernels against the plain-PyTorch reference: outputs and the
gradients of x, fn, base and scale, with a float64 run of the reference as ground truth.

Without a GPU the kernels run in Triton's interpreter (``tests/conftest.py`` sets
``TRITON_INTERPRET=1``); with one, the same tests run on it.
"""

import pytest
import torch

from mhc_megatron import ops
from mhc_megatron.kernels.coefficients import mhc_coefficients

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (rtol, atol as a fraction of the largest |reference| entry) per x dtype. The kernels compute in
# fp32 from x's exact values, so the fp32 entries bound fp32 rounding against the fp64 truth.
TOLERANCES = {
    torch.float32: {
        # A K-long dot, the RMS and 20 Sinkhorn rounds in fp32 (the fp32 reference itself is off
        # by up to ~4e-7 of the max); on GPU the projection's tf32x3 MMAs add ~2^-21 relative
        # per product. The eps terms (1e-6) are below this: test_eps_reaches_every_use checks them.
        "out": (1e-5, 5e-6),
        # Back through the same chain, then sums over up to T*n*n terms (d_scale, d_base, d_fn):
        # the fp32 reference is off by up to ~1e-6 of the max.
        "grad": (1e-4, 1e-5),
        "grad_x": (1e-4, 1e-5),
    },
    torch.bfloat16: {
        # x is exact in fp32, so outputs and fp32 parameter gradients see fp32 rounding only.
        "out": (1e-5, 5e-6),
        "grad": (1e-4, 1e-5),
        # d_x is stored in bf16: one bf16 ulp is 2^-7 relative, and the interpreter truncates
        # fp32 -> bf16 instead of rounding to nearest, so a full ulp (not half) can be lost.
        "grad_x": (2**-7, 1e-5),
    },
    torch.float16: {
        "out": (1e-5, 5e-6),
        "grad": (1e-4, 1e-5),
        # d_x is stored in fp16: one ulp is 2^-10 relative (truncated under the interpreter).
        "grad_x": (2**-10, 1e-5),
    },
}
NAMES = ("h_pre", "h_post", "h_res", "d_x", "d_fn", "d_base", "d_scale")
# The interpreter's numpy sigmoid, 1 / (1 + exp(-z)), overflows exp for z << 0 and warns; the
# result, 1 / inf = 0, is the right one.
_SATURATED_SIGMOID = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _site(n, c, t, seed, dtype=torch.float32, fn_scale=None):
    """Random ``[x [t, n, c], fn, base, scale, [grads of h_pre, h_post, h_res]]``; logits of a
    few units."""
    gen = torch.Generator().manual_seed(seed)
    rows = n * n + 2 * n
    x = torch.randn(t, n, c, generator=gen).to(dtype)
    fn_scale = (n * c) ** -0.5 if fn_scale is None else fn_scale  # mixes of order 1
    fn = torch.randn(rows, n * c, generator=gen) * fn_scale
    base = torch.randn(rows, generator=gen)
    scale = torch.rand(3, generator=gen) + 0.5
    grads = [torch.randn(t, *s, generator=gen).to(DEVICE) for s in ((n,), (n,), (n, n))]
    return [v.to(DEVICE) for v in (x, fn, base, scale)] + [grads]


def _run(fn_impl, x, fn, base, scale, grads, compute_dtype=None, **kwargs):
    """Outputs and gradients ``(h_pre, h_post, h_res, d_x, d_fn, d_base, d_scale)`` of
    ``sum(out * grad)``; ``compute_dtype`` casts every input first (float64 ground truth)."""
    inputs = [
        v.detach() if compute_dtype is None else v.detach().to(compute_dtype)
        for v in (x, fn, base, scale)
    ]
    inputs = [v.requires_grad_() for v in inputs]
    outs = fn_impl(*inputs, **kwargs)
    loss = sum((o * g.to(o.dtype)).sum() for o, g in zip(outs, grads, strict=True))
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, inputs))


def _assert_close(actual, expected, tol, name):
    rtol, atol = tol
    atol = atol * expected.abs().max().item()
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}"
    )


def _check_against(kernel, expected, dtype):
    tol = TOLERANCES[dtype]
    for name, a, e in zip(NAMES, kernel, expected, strict=True):
        key = "out" if name.startswith("h_") else "grad_x" if name == "d_x" else "grad"
        _assert_close(a, e, tol[key], name)


@pytest.mark.parametrize("iters", [1, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("n", "c", "t"),
    # C not a multiple of the 64-wide column block, T not a multiple of the token block; n = 3
    # exercises the padding of a non-power-of-two n.
    [(1, 24, 33), (2, 24, 37), (3, 72, 19), (4, 40, 50), (8, 24, 21)],
)
def test_matches_reference(n, c, t, dtype, iters):
    site = _site(n, c, t, seed=1000 * n + c + t + iters, dtype=dtype)
    kernel = _run(mhc_coefficients, *site, iters=iters)
    expected = _run(ops.mhc_coefficients, *site, compute_dtype=torch.float64, iters=iters)
    for v in kernel[:3]:
        assert v.dtype == torch.float32
    assert kernel[3].dtype == dtype and kernel[3].shape == site[0].shape
    _check_against(kernel, expected, dtype)


def test_fp16_x():
    site = _site(4, 40, 23, seed=16, dtype=torch.float16)
    kernel = _run(mhc_coefficients, *site)
    _check_against(
        kernel, _run(ops.mhc_coefficients, *site, compute_dtype=torch.float64), torch.float16
    )


def test_many_tokens():
    # Enough token blocks for the forward's 64-token programs (chosen once there are two per SM).
    site = _site(4, 24, 520, seed=2)
    kernel = _run(mhc_coefficients, *site)
    _check_against(
        kernel, _run(ops.mhc_coefficients, *site, compute_dtype=torch.float64), torch.float32
    )


def test_leading_dims_and_non_contiguous_x():
    n, c = 4, 24
    x, fn, base, scale, *_ = _site(n, c, 2 * 7, seed=3)
    x = x.view(2, 7, n, c).transpose(0, 1)  # [s, b, n, C], not contiguous
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(7, 2, *s, generator=gen).to(DEVICE) for s in ((n,), (n,), (n, n))]
    kernel = _run(mhc_coefficients, x, fn, base, scale, grads)
    expected = _run(ops.mhc_coefficients, x, fn, base, scale, grads, compute_dtype=torch.float64)
    assert kernel[0].shape == (7, 2, n) and kernel[2].shape == (7, 2, n, n)
    assert kernel[3].shape == x.shape
    _check_against(kernel, expected, torch.float32)


@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_all_zero_tokens(eps):
    # An all-zero token has inv_rms = rsqrt(eps) (1000 at eps = 1e-6) and mixes 0: its h are
    # sigmoid(base) and sinkhorn(base); d_x of that token is (d_mixes * inv_rms) @ fn, finite.
    site = _site(4, 40, 37, seed=5)
    site[0][::3] = 0.0
    kernel = _run(mhc_coefficients, *site, eps=eps)
    expected = _run(ops.mhc_coefficients, *site, compute_dtype=torch.float64, eps=eps)
    assert all(v.isfinite().all() for v in kernel)
    _check_against(kernel, expected, torch.float32)


def test_eps_reaches_every_use():
    # eps = 0.1 is visible in the RMS, in h_pre and in the Sinkhorn denominators: a kernel that
    # dropped or hard-coded it in any of them would miss the reference by far more than rounding.
    site = _site(2, 24, 17, seed=6)
    kernel = _run(mhc_coefficients, *site, eps=0.1)
    _check_against(
        kernel,
        _run(ops.mhc_coefficients, *site, compute_dtype=torch.float64, eps=0.1),
        torch.float32,
    )
    default = _run(ops.mhc_coefficients, *site, compute_dtype=torch.float64)
    assert (kernel[0] - default[0]).abs().min() > 0.05  # h_pre carries + eps


@_SATURATED_SIGMOID
def test_large_logits_with_a_large_common_part():
    # Res logits of about +-600 that differ by a few units: exp(L) overflows without the max
    # shift. Pre/post logits of hundreds saturate the sigmoids. Compared with the fp32 reference,
    # which rounds the big logits the same way (fp64 logits differ by ~600 * 2^-24 each).
    n, c = 4, 40
    x, fn, base, scale, grads = _site(n, c, 29, seed=7)
    gen = torch.Generator().manual_seed(8)
    common = torch.randn(n * c, generator=gen).to(DEVICE)
    fn = torch.randn(fn.shape, generator=gen).to(DEVICE)
    fn[2 * n :] = common + 0.002 * fn[2 * n :]
    scale = torch.full_like(scale, 50.0)
    kernel = _run(mhc_coefficients, x, fn, base, scale, grads)
    expected = _run(ops.mhc_coefficients, x, fn, base, scale, grads)
    assert all(v.isfinite().all() for v in kernel)
    assert kernel[2].amax() < 1.0 - 1e-3  # not a one-hot matrix: the gradient is informative
    # Logits of ~600 carry ~4e-5 absolute fp32 rounding (~3e-4 on GPU, where the projection's
    # tf32x3 MMAs are ~2^-21 relative per product), which exp turns into relative error.
    for name, a, e in zip(NAMES, kernel, expected, strict=True):
        _assert_close(a, e, (2e-3, 5e-4), name)


@_SATURATED_SIGMOID
def test_huge_logit_spread():
    # Logit spreads of hundreds leave near-empty Sinkhorn columns (mass << eps). The forward stays
    # finite and matches. The gradient of the unrolled iteration with respect to the matrix
    # values is divided by ~eps each round there and used to overflow to NaN (the cause of
    # --init-method-std 1e4 turning into a NaN grad norm); both backwards now carry the gradient
    # of log M, which stays finite, and they agree.
    x, fn, base, scale, grads = _site(4, 40, 29, seed=9, fn_scale=1.0)
    scale = torch.full_like(scale, 50.0)
    kernel = _run(mhc_coefficients, x, fn, base, scale, grads)
    expected = _run(ops.mhc_coefficients, x, fn, base, scale, grads)
    for name, a, e in zip(NAMES, kernel, expected, strict=True):
        assert a.isfinite().all(), name
        # As in the test above: logits of ~+-600 carry up to ~3e-4 absolute error on GPU (of the
        # largest entry, for the gradients too: the same rounding, propagated linearly).
        _assert_close(a, e, (0.0, 1e-3), name)
    h_res = kernel[2]
    assert (h_res >= 0).all()
    # Rows end the iteration: they sum to 1 up to eps and fp32 rounding (spec: 1e-5), except rows
    # whose exp(L - max) underflowed to 0 everywhere; those stay 0, as in the reference.
    rows = h_res.sum(-1)
    assert torch.minimum(rows, (rows - 1).abs()).max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_weight_gradients(dtype):
    # Enough tokens for several token blocks and token splits of the d_fn reduction.
    site = _site(4, 40, 300, seed=10, dtype=dtype)
    first = _run(mhc_coefficients, *site, deterministic=True)
    second = _run(mhc_coefficients, *site, deterministic=True)
    default = _run(mhc_coefficients, *site)  # no atomics: the same in both modes
    for name, a, b, c in zip(NAMES, first, second, default, strict=True):
        assert torch.equal(a, b), name
        assert torch.equal(a, c), name


def test_no_tokens():
    x, fn, base, scale, *_ = _site(4, 24, 0, seed=11)
    x.requires_grad_()
    fn.requires_grad_()
    h_pre, h_post, h_res = mhc_coefficients(x, fn, base, scale)
    assert h_pre.shape == (0, 4) and h_res.shape == (0, 4, 4)
    (h_pre.sum() + h_post.sum() + h_res.sum()).backward()
    assert x.grad.shape == x.shape and torch.equal(fn.grad, torch.zeros_like(fn))


def test_rejects_unsupported_inputs():
    x, fn, base, scale, *_ = _site(4, 24, 3, seed=12)
    with pytest.raises(ValueError, match="mhc_num_streams=16 .*--mhc-backend torch"):
        mhc_coefficients(torch.zeros(3, 16, 8, device=DEVICE), fn, base, scale)
    with pytest.raises(ValueError, match=r"fn must be \[n\*n \+ 2n, n\*C\] = \[24, 96\]"):
        mhc_coefficients(x, fn[:, :-1], base, scale)
    with pytest.raises(ValueError, match="base must be"):
        mhc_coefficients(x, fn, base[:-1], scale)
    with pytest.raises(ValueError, match="bf16, fp16 or fp32 x"):
        mhc_coefficients(x.double(), fn, base, scale)
    with pytest.raises(ValueError, match="must be fp32"):
        mhc_coefficients(x, fn.double(), base, scale)
    with pytest.raises(ValueError, match="iters >= 1"):
        mhc_coefficients(x, fn, base, scale, iters=0)
