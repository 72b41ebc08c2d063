"""The plain-PyTorch mHC math against docs/mhc-spec.md: hand-computed values, the doubly
stochastic properties of section 5, and float64 gradchecks of every op."""

import math

import pytest
import torch

from mhc_megatron import ops


def _site_params(n: int, c: int, generator: torch.Generator, dtype=torch.float64, lite=False):
    """Random ``(fn, base, scale)`` of one site, scaled so the logits span a few units."""
    rows = 2 * n + (math.factorial(n) if lite else n * n)
    fn = torch.randn(rows, n * c, generator=generator, dtype=dtype)
    base = torch.randn(rows, generator=generator, dtype=dtype)
    scale = torch.rand(3, generator=generator, dtype=dtype) + 0.5
    return fn, base, scale


@pytest.mark.parametrize("n", [2, 4, 8])
def test_sinkhorn_doubly_stochastic(n):
    gen = torch.Generator().manual_seed(n)
    # Logits of the size mHC produces (alpha = 0.01 times O(10) mixes plus O(1) biases). Wider
    # logits converge more slowly: see test_sinkhorn_column_error_shrinks_with_iterations.
    logits = 0.5 * torch.randn(256, n, n, generator=gen)
    h = ops.sinkhorn(logits, iters=20, eps=1e-6)
    assert h.dtype == torch.float32
    assert (h >= 0).all()
    # Rows end the iteration: exact up to eps/rowsum and fp32 rounding of n additions (spec: 1e-5).
    torch.testing.assert_close(h.sum(-1), torch.ones(256, n), rtol=0, atol=1e-5)
    # Columns converge geometrically; the spec's bound after 20 iterations is 1e-3.
    torch.testing.assert_close(h.sum(-2), torch.ones(256, n), rtol=0, atol=1e-3)
    # A doubly stochastic matrix has spectral norm 1 (spec: <= 1 + 1e-4).
    spectral = torch.linalg.matrix_norm(h.double(), ord=2)
    assert spectral.max() <= 1 + 1e-4


def test_sinkhorn_column_error_shrinks_with_iterations():
    gen = torch.Generator().manual_seed(0)
    logits = 2.0 * torch.randn(512, 4, 4, generator=gen)
    errors = [(ops.sinkhorn(logits, iters=k).sum(-2) - 1).abs().max().item() for k in (5, 20, 200)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-3


def test_sinkhorn_one_iteration_by_hand():
    # M = [[1, 3], [1, 1]] (up to the max shift). Columns: sums [2, 4] -> [[.5, .75], [.5, .25]];
    # rows: sums [1.25, .75] -> [[.4, .6], [2/3, 1/3]].
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    h = ops.sinkhorn(logits, iters=1, eps=0.0)
    expected = torch.tensor([[0.4, 0.6], [2 / 3, 1 / 3]])
    torch.testing.assert_close(h, expected, rtol=0, atol=1e-6)  # fp32 rounding of 4 divisions


def test_sinkhorn_gradient_stays_finite_where_entries_underflow():
    # Logits hundreds apart underflow whole columns of exp(L - max) in fp32; autograd of the
    # unrolled iteration then multiplies the gradient by ~1/eps per step and ends at inf/NaN.
    # ops.sinkhorn's backward carries the gradient of log M instead.
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 4, 4, generator=gen) * 300.0
    upstream = torch.randn(16, 4, 4, generator=gen)
    leaf = logits.clone().requires_grad_()
    (grad,) = torch.autograd.grad((ops.sinkhorn(leaf) * upstream).sum(), leaf)
    assert torch.isfinite(grad).all()
    # Where nothing underflows it is the same gradient as autograd of the plain iteration
    # (float64: both are exact to ~1e-15 there).
    moderate = (torch.randn(16, 4, 4, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    m = torch.exp(moderate - moderate.amax(dim=(-2, -1), keepdim=True))
    for _ in range(20):
        m = m / (m.sum(-2, keepdim=True) + 1e-6)
        m = m / (m.sum(-1, keepdim=True) + 1e-6)
    (expected,) = torch.autograd.grad((m * upstream.double()).sum(), moderate)
    (actual,) = torch.autograd.grad((ops.sinkhorn(moderate) * upstream.double()).sum(), moderate)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: ops.sinkhorn(t, iters=3), (moderate[:2],))


def test_sinkhorn_uniform_and_extreme_logits():
    n = 4
    torch.testing.assert_close(
        ops.sinkhorn(torch.zeros(n, n)), torch.full((n, n), 1 / n), rtol=0, atol=1e-6
    )
    # Large logits within fp32's exp range of the matrix max (exp(-87) is still a normal float):
    # finite, non-negative, rows of sum 1.
    extreme = torch.tensor([[80.0, -5.0, 0, 0], [0, 60, -5, 0], [0, 0, 0, 0], [70, 75, 40, 60]])
    h = ops.sinkhorn(extreme)
    assert torch.isfinite(h).all() and (h >= 0).all()
    torch.testing.assert_close(h.sum(-1), torch.ones(n), rtol=0, atol=1e-5)
    # A row entirely more than ~104 below the matrix max underflows to zeros: eps keeps it finite
    # (all-zero row, no NaN) instead of dividing 0 by 0.
    h = ops.sinkhorn(torch.tensor([[200.0, 0.0], [0.0, 0.0]]))
    assert torch.isfinite(h).all() and h[1].abs().sum() == 0


def test_sinkhorn_rejects_bad_inputs():
    with pytest.raises(ValueError, match="iters >= 1"):
        ops.sinkhorn(torch.zeros(2, 2), iters=0)
    with pytest.raises(ValueError, match="square"):
        ops.sinkhorn(torch.zeros(2, 3))


def test_mhc_coefficients_by_hand():
    # n = 2, C = 1, x = (3, 4): mean(x*x) = 12.5, so every mix is (fn_row . x) / sqrt(12.5).
    eps = 1e-6
    x = torch.tensor([[3.0], [4.0]])
    fn = torch.zeros(8, 2)
    fn[0] = torch.tensor([1.0, 0.0])  # pre stream 0 -> 3 / sqrt(12.5)
    fn[3] = torch.tensor([0.0, 1.0])  # post stream 1 -> 4 / sqrt(12.5)
    fn[5] = torch.tensor([1.0, 1.0])  # res entry (0, 1) -> 7 / sqrt(12.5)
    base = torch.zeros(8)
    base[1] = 0.5  # pre stream 1
    base[2] = -1.0  # post stream 0
    scale = torch.tensor([2.0, 3.0, 0.5])
    h_pre, h_post, h_res = ops.mhc_coefficients(x, fn, base, scale, iters=20, eps=eps)

    rms = math.sqrt(12.5 + eps)

    def sig(v):
        return 1 / (1 + math.exp(-v))

    expected_pre = [sig(2.0 * 3 / rms) + eps, sig(0.5) + eps]
    expected_post = [2 * sig(-1.0), 2 * sig(3.0 * 4 / rms)]
    torch.testing.assert_close(h_pre, torch.tensor(expected_pre), rtol=1e-6, atol=0)
    torch.testing.assert_close(h_post, torch.tensor(expected_post), rtol=1e-6, atol=0)
    # The res logits are [[0, 0.5 * 7 / rms], [0, 0]] in row-major order [i*n + j]:
    expected_res = ops.sinkhorn(torch.tensor([[0.0, 0.5 * 7 / rms], [0.0, 0.0]]), 20, eps)
    torch.testing.assert_close(h_res, expected_res, rtol=0, atol=1e-7)
    # Entry (0, 1) holds the larger logit: a transposed reshape would put the mass at (1, 0).
    assert h_res[0, 1] > h_res[1, 1] and h_res[1, 0] > h_res[0, 0]


def test_hc_coefficients_by_hand():
    x = torch.tensor([[3.0], [4.0]])
    fn = torch.zeros(8, 2)
    fn[0] = torch.tensor([1.0, 0.0])
    fn[6] = torch.tensor([0.0, 1.0])  # res entry (1, 0)
    base = torch.arange(8, dtype=torch.float32) / 10
    scale = torch.tensor([2.0, 3.0, 0.5])
    h_pre, h_post, h_res = ops.hc_coefficients(x, fn, base, scale, eps=0.0)
    rms = math.sqrt(12.5)
    torch.testing.assert_close(h_pre, torch.tensor([2 * math.tanh(3 / rms), 0.1]))
    torch.testing.assert_close(h_post, torch.tensor([0.2, 0.3]))
    torch.testing.assert_close(
        h_res, torch.tensor([[0.4, 0.5], [0.6 + 0.5 * math.tanh(4 / rms), 0.7]])
    )


def test_coefficients_shapes_dtypes_and_mismatch():
    gen = torch.Generator().manual_seed(0)
    n, c = 4, 8
    fn, base, scale = _site_params(n, c, gen, dtype=torch.float32)
    x = torch.randn(5, 3, n, c, generator=gen).to(torch.bfloat16)
    h_pre, h_post, h_res = ops.mhc_coefficients(x, fn, base, scale)
    assert h_pre.shape == (5, 3, n) and h_post.shape == (5, 3, n) and h_res.shape == (5, 3, n, n)
    assert h_pre.dtype == h_post.dtype == h_res.dtype == torch.float32
    assert ((h_post > 0) & (h_post < 2)).all() and (h_pre > 0).all()
    with pytest.raises(ValueError, match="does not match"):
        ops.mhc_coefficients(torch.randn(3, n, c + 1), fn, base, scale)
    with pytest.raises(ValueError, match="n\\*n \\+ 2n rows"):
        ops.num_streams_from_fn(torch.zeros(7, 4))


def test_pre_and_post_res_against_loops():
    gen = torch.Generator().manual_seed(1)
    n, c = 3, 5
    x = torch.randn(7, n, c, generator=gen)
    y = torch.randn(7, c, generator=gen)
    h_pre = torch.rand(7, n, generator=gen)
    h_post = torch.rand(7, n, generator=gen)
    h_res = torch.rand(7, n, n, generator=gen)
    u = ops.mhc_pre(x, h_pre)
    out = ops.mhc_post_res(x, y, h_post, h_res)
    for t in range(7):
        expected_u = sum(h_pre[t, j] * x[t, j] for j in range(n))
        torch.testing.assert_close(u[t], expected_u)
        for i in range(n):
            expected = sum(h_res[t, i, j] * x[t, j] for j in range(n)) + h_post[t, i] * y[t]
            torch.testing.assert_close(out[t, i], expected)
    bf = ops.mhc_post_res(x.bfloat16(), y.bfloat16(), h_post, h_res)
    assert bf.dtype == torch.bfloat16 and ops.mhc_pre(x.bfloat16(), h_pre).dtype == torch.bfloat16


def test_streams_expand_and_collapse():
    gen = torch.Generator().manual_seed(2)
    n, c = 4, 6
    x = torch.randn(2, 3, c, generator=gen)
    streams = ops.expand_streams(x, n)
    assert streams.shape == (2, 3, n, c) and streams.is_contiguous()
    torch.testing.assert_close(ops.collapse_mean(streams), x)
    # Residual-equivalent head: base logit(1/n), scale 0 -> w = 1/n + eps for every stream.
    eps = 1e-6
    out = ops.collapse_head(
        streams,
        torch.randn(n, n * c, generator=gen),
        torch.full((n,), math.log(1 / (n - 1))),
        torch.zeros(1),
        eps=eps,
    )
    torch.testing.assert_close(out, x * (1 + n * eps), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="n >= 1"):
        ops.expand_streams(x, 0)
    with pytest.raises(ValueError, match="fn_h must be"):
        ops.collapse_head(streams, torch.zeros(n, c), torch.zeros(n), torch.zeros(1))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_mhc_lite_is_exactly_doubly_stochastic(n):
    """Birkhoff-von Neumann by construction: rows and columns sum to 1 to fp32 rounding (mHC's
    Sinkhorn leaves columns off by up to 1e-3), for any logits, large ones included."""
    gen = torch.Generator().manual_seed(n)
    fn, base, scale = _site_params(n, 5, gen, dtype=torch.float32, lite=True)
    x = torch.randn(64, n, 5, generator=gen) * 30.0
    h_pre, h_post, h_res = ops.mhc_lite_coefficients(x, fn, base * 10, scale * 10)
    assert h_res.shape == (64, n, n) and h_pre.shape == h_post.shape == (64, n)
    assert h_res.min() >= 0
    # fp32: a sum of n! weights, each rounded once: a few ulps.
    torch.testing.assert_close(h_res.sum(-1), torch.ones(64, n), rtol=0, atol=2e-6)
    torch.testing.assert_close(h_res.sum(-2), torch.ones(64, n), rtol=0, atol=2e-6)


def test_mhc_lite_coefficients_by_hand():
    """n = 2: H_res = w0 I + w1 [[0, 1], [1, 0]], w = softmax(a_res * m_res + b_res)."""
    x = torch.tensor([[3.0], [4.0]])
    fn = torch.zeros(6, 2)
    fn[5] = torch.tensor([1.0, 1.0])  # swap's logit gets 7 / rms
    base = torch.zeros(6)
    base[4] = 0.25  # identity's static logit
    scale = torch.tensor([1.0, 1.0, 0.5])
    _, _, h_res = ops.mhc_lite_coefficients(x, fn, base, scale, eps=1e-6)
    logits = torch.tensor([0.25, 0.5 * 7 / math.sqrt(12.5 + 1e-6)])
    w = torch.softmax(logits, 0)
    expected = torch.tensor([[w[0], w[1]], [w[1], w[0]]])
    torch.testing.assert_close(h_res, expected, rtol=1e-6, atol=0)
    perms = ops.permutation_matrices(3)
    assert perms.shape == (6, 3, 3) and torch.equal(perms[0], torch.eye(3))
    assert torch.equal(perms.sum(0), torch.full((3, 3), 2.0))  # each (i, j) in (n-1)! of them


def test_mhc_lite_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"fn \[n!\+2n, n\*C\]"):
        ops.mhc_lite_coefficients(
            torch.zeros(2, 3, 4), torch.zeros(15, 12), torch.zeros(15), torch.ones(3)
        )
    with pytest.raises(ValueError, match="outside 1..6"):
        ops.permutation_matrices(7)


def test_residual_equivalent_res_logits_give_identity():
    n = 4
    base_res = torch.full((n, n), -12.0).fill_diagonal_(0.0)
    h = ops.sinkhorn(base_res)
    torch.testing.assert_close(h, torch.eye(n), rtol=0, atol=1e-4)  # spec section 4


# float64 gradchecks: finite differences need fp64 (fp32 would hide wrong gradients in noise).
@pytest.mark.parametrize("n", [2, 3])
def test_gradcheck_sinkhorn(n):
    gen = torch.Generator().manual_seed(n)
    logits = torch.randn(2, n, n, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: ops.sinkhorn(v, iters=5, eps=1e-6), (logits,))


@pytest.mark.parametrize("coefficients", ["mhc", "hc", "mhc-lite"])
def test_gradcheck_coefficients(coefficients):
    gen = torch.Generator().manual_seed(3)
    n = 3 if coefficients == "mhc-lite" else 2  # 3! = 6 permutations: more than transpositions
    c = 3
    fn, base, scale = _site_params(n, c, gen, lite=coefficients == "mhc-lite")
    x = torch.randn(3, n, c, generator=gen, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, fn, base, scale))
    if coefficients == "mhc":

        def fun(*args):
            return ops.mhc_coefficients(*args, iters=4)
    elif coefficients == "mhc-lite":
        fun = ops.mhc_lite_coefficients
    else:
        fun = ops.hc_coefficients
    assert torch.autograd.gradcheck(fun, inputs)


def test_gradcheck_mix_and_streams():
    gen = torch.Generator().manual_seed(4)
    n, c = 3, 4
    x = torch.randn(2, n, c, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, c, generator=gen, dtype=torch.float64, requires_grad=True)
    h_pre = torch.rand(2, n, generator=gen, dtype=torch.float64, requires_grad=True)
    h_post = torch.rand(2, n, generator=gen, dtype=torch.float64, requires_grad=True)
    h_res = torch.rand(2, n, n, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.mhc_pre, (x, h_pre))
    assert torch.autograd.gradcheck(ops.mhc_post_res, (x, y, h_post, h_res))
    assert torch.autograd.gradcheck(ops.collapse_mean, (x,))
    fn_h = torch.randn(n, n * c, generator=gen, dtype=torch.float64, requires_grad=True)
    base_h = torch.randn(n, generator=gen, dtype=torch.float64, requires_grad=True)
    scale_h = torch.rand(1, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.collapse_head, (x, fn_h, base_h, scale_h))
    z = torch.randn(2, c, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: ops.expand_streams(v, n), (z,))
