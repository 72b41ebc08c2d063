"""The fused site (``kernels.mhc_site_enter`` / ``mhc_site_exit``) against the plain-PyTorch
reference: outputs and every gradient through a branch between the two halves.

The reference is ``ops.mhc_coefficients -> ops.mhc_pre -> branch -> ops.mhc_post_res`` in
float64 on the same (upcast, exact) inputs. The branch ``y = tanh(u) * w`` has a parameter, so
the gradient of the branch input is checked too. Without a GPU the kernels run in Triton's
interpreter (``tests/conftest.py``); the same tests run unchanged on a GPU.
"""

import pytest
import torch

from mhc_megatron import kernels, ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (rtol, atol as a fraction of the largest |reference| entry).
TOLERANCES = {
    # As the separate ops (tests/kernels/test_kernels_coefficients.py, test_kernels_mix.py): fp32
    # rounding of the K-long projection, 20 Sinkhorn rounds and sums over tokens; dx adds four
    # fp32 terms before its one store.
    torch.float32: {"stream": (1e-5, 1e-5), "grad": (1e-4, 1e-5)},
    # x_next and dx are stored in bf16: one ulp (2^-7), a full one because the interpreter
    # truncates. The branch input u is bf16 too, so the coefficient gradients see bf16 rounding
    # of du and y: 2^-7 relative per entry, averaged over C terms, hence 2e-2 of the max.
    torch.bfloat16: {"stream": (2**-7, 2**-7), "grad": (2e-2, 2e-2)},
}
NAMES = ("x_next", "d_x", "d_fn", "d_base", "d_scale", "d_w")


def _inputs(n, c, t, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = n * n + 2 * n
    x = torch.randn(t, n, c, generator=gen).to(dtype)
    fn = torch.randn(rows, n * c, generator=gen) * (n * c) ** -0.5
    base = torch.randn(rows, generator=gen)
    scale = torch.rand(3, generator=gen) + 0.5
    w = torch.randn(c, generator=gen)
    grad = torch.randn(t, n, c, generator=gen).to(dtype)
    return [v.to(DEVICE) for v in (x, fn, base, scale, w, grad)]


def _reference(x, fn, base, scale, w):
    h_pre, h_post, h_res = ops.mhc_coefficients(x, fn, base, scale)
    y = torch.tanh(ops.mhc_pre(x, h_pre)) * w
    return ops.mhc_post_res(x, y, h_post, h_res)


def _fused(x, fn, base, scale, w):
    u, _, h_post, h_res, link = kernels.mhc_site_enter(x, fn, base, scale)
    y = (torch.tanh(u.float()) * w).to(x.dtype)
    return kernels.mhc_site_exit(x, y, h_post, h_res, link)


def _run(site, inputs, grad, dtype=None):
    leaves = [v.detach().to(dtype or v.dtype).requires_grad_() for v in inputs]
    out = site(*leaves)
    grads = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    return [out.detach(), *grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("n", "c", "t"),
    # C not a multiple of the 64-wide column block; T not a multiple of the token blocks; n = 3
    # pads to 4; n = 8 is the largest the kernels take.
    [(1, 24, 9), (3, 72, 19), (4, 40, 37), (8, 24, 11)],
)
def test_matches_reference(n, c, t, dtype):
    *inputs, grad = _inputs(n, c, t, dtype)
    got = _run(_fused, inputs, grad)
    want = _run(_reference, inputs, grad, torch.float64)
    tol = TOLERANCES[dtype]
    for name, a, e in zip(NAMES, got, want, strict=True):
        rtol, atol = tol["stream" if name in ("x_next", "d_x") else "grad"]
        torch.testing.assert_close(
            a.double(), e, rtol=rtol, atol=atol * e.abs().max().item(), msg=name
        )


def test_same_as_the_separate_kernels_and_bitwise_repeatable():
    """fp32: the fused site against the three separate kernels (same math, dx summed in fp32
    before its store instead of by autograd), and twice in a row bit for bit."""
    *inputs, grad = _inputs(4, 40, 150, torch.float32, seed=1)  # 3 token blocks, 2+ splits

    def separate(x, fn, base, scale, w):
        h_pre, h_post, h_res = kernels.mhc_coefficients(x, fn, base, scale)
        y = torch.tanh(kernels.mhc_pre(x, h_pre)) * w
        return kernels.mhc_post_res(x, y, h_post, h_res)

    first, second = _run(_fused, inputs, grad), _run(_fused, inputs, grad)
    for name, a, b in zip(NAMES, first, second, strict=True):
        assert torch.equal(a, b), name
    for name, a, b in zip(NAMES, first, _run(separate, inputs, grad), strict=True):
        # fp32 sums in another order (dx's four terms): a few fp32 ulps of the largest entry.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item(), msg=name)


def test_gradient_without_the_exit():
    """A loss on the branch input alone: the enter's backward runs with no dout from the exit."""
    x, fn, base, scale, *_ = _inputs(4, 24, 7, torch.float32, seed=2)
    leaves = [v.requires_grad_() for v in (x, fn, base, scale)]
    u, *_ = kernels.mhc_site_enter(*leaves)
    got = torch.autograd.grad(u.square().sum(), leaves)
    ref = [v.detach().double().requires_grad_() for v in leaves]
    h_pre, _, _ = ops.mhc_coefficients(*ref)
    want = torch.autograd.grad(ops.mhc_pre(ref[0], h_pre).square().sum(), ref)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5 * e.abs().max().item())


def test_h_pre_is_returned_without_gradient():
    x, fn, base, scale, *_ = _inputs(2, 16, 3, torch.float32)
    _, h_pre, _, _, _ = kernels.mhc_site_enter(x, fn.requires_grad_(), base, scale)
    expected, _, _ = ops.mhc_coefficients(x, fn, base, scale)
    torch.testing.assert_close(h_pre, expected.detach(), rtol=1e-5, atol=1e-6)
    assert not h_pre.requires_grad  # its effect reaches the parameters through u


def test_rejects_unsupported_inputs():
    x, fn, base, scale, *_ = _inputs(4, 16, 3, torch.float32)
    with pytest.raises(ValueError, match="n <= 8"):
        kernels.mhc_site_enter(torch.zeros(3, 9, 16, device=DEVICE), fn, base, scale)
    u, _, h_post, h_res, link = kernels.mhc_site_enter(x, fn, base, scale)
    with pytest.raises(ValueError, match="y must have shape"):
        kernels.mhc_site_exit(x, u[:2], h_post, h_res, link)


def test_no_tokens():
    """An empty micro-batch shard (T = 0): shapes hold and every gradient is zero."""
    x = torch.zeros(0, 4, 16, device=DEVICE, requires_grad=True)
    fn = torch.randn(24, 64, device=DEVICE, requires_grad=True)
    base, scale = torch.zeros(24, device=DEVICE), torch.ones(3, device=DEVICE)
    u, _, h_post, h_res, link = kernels.mhc_site_enter(x, fn, base, scale)
    kernels.mhc_site_exit(x, u, h_post, h_res, link).sum().backward()
    assert x.grad.shape == x.shape and torch.equal(fn.grad, torch.zeros_like(fn))
