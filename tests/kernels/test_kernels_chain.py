"""Fused sites in a row, with chained backward passes (``kernels.chain``), against the
plain-PyTorch reference and against the same sites unchained.

Site B entered with ``after=`` site A's link runs its ``dx`` pass together with A's exit
backward, rebuilding B's input streams from A's inputs. The reference is the ops in float64 on
the same inputs; the unchained run is the same kernels with each site's own passes. Without a
GPU the kernels run in Triton's interpreter (``tests/conftest.py``). The empty batch (no tokens)
is in ``tests/kernels/test_kernels_chain_no_tokens.py``.
"""

import pytest
import torch

from mhc_megatron import kernels, ops
from mhc_megatron.kernels import chain

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (rtol, atol as a fraction of the largest |reference| entry). fp32 as test_kernels_site.py:
# rounding of K-long projections, 20 Sinkhorn rounds and sums over tokens. bf16: one site
# there is within 2^-7 (streams, dx) and 2e-2 (parameter grads); over three sites in a row the
# bf16 roundings of streams, branch inputs/outputs and dx (2^-7 each, the interpreter
# truncates) compound, through the coefficients too: measured up to 2.7e-2 of the max, chained
# or not (the chained run matches the unchained one far tighter, below).
TOLERANCES = {
    torch.float32: {"stream": (1e-5, 1e-5), "grad": (1e-4, 1e-5)},
    torch.bfloat16: {"stream": (4e-2, 4e-2), "grad": (4e-2, 4e-2)},
}
SITES = 3  # two chained pairs: the middle site is both a chain's B and the next one's A


def _inputs(n, c, t, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = n * n + 2 * n
    x = torch.randn(t, n, c, generator=gen).to(dtype)
    params = []
    for _ in range(SITES):
        params += [
            torch.randn(rows, n * c, generator=gen) * (n * c) ** -0.5,
            torch.randn(rows, generator=gen),
            torch.rand(3, generator=gen) + 0.5,
            torch.randn(c, generator=gen),  # the branch's parameter
        ]
    grad = torch.randn(t, n, c, generator=gen).to(dtype)
    return [v.to(DEVICE) for v in (x, *params, grad)]


def _fused(x, *params, chained=True, tap=None):
    link = None
    for k in range(SITES):
        fn, base, scale, w = params[4 * k : 4 * k + 4]
        u, _, h_post, h_res, new = kernels.mhc_site_enter(
            x, fn, base, scale, after=link if chained else None
        )
        y = (torch.tanh(u.float()) * w).to(x.dtype)
        x, link = kernels.mhc_site_exit(x, y, h_post, h_res, new), new
        if tap is not None and k == 0:
            tap.append(x)  # the streams between sites 0 and 1, for another consumer
    return x


def _reference(x, *params):
    for k in range(SITES):
        fn, base, scale, w = params[4 * k : 4 * k + 4]
        h_pre, h_post, h_res = ops.mhc_coefficients(x, fn, base, scale)
        y = torch.tanh(ops.mhc_pre(x, h_pre)) * w
        x = ops.mhc_post_res(x, y, h_post, h_res)
    return x


def _run(fn, inputs, grad, dtype=None, **kwargs):
    leaves = [v.detach().to(dtype or v.dtype).requires_grad_() for v in inputs]
    out = fn(*leaves, **kwargs)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad.to(out.dtype))]


@pytest.fixture
def chain_calls(monkeypatch):
    calls = []
    real = chain.backward_x_chain

    def counted(*args, **kwargs):
        calls.append(args[-1])
        return real(*args, **kwargs)

    monkeypatch.setattr(chain, "backward_x_chain", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("n", "c", "t"),
    # C not a multiple of the column block (256 / n_pad); T over several 16-token blocks and
    # not a multiple of them; n = 3 pads to 4; n = 2 doubles the column block.
    [(2, 200, 37), (3, 72, 19), (4, 80, 53)],
)
def test_chained_sites_match_reference_and_unchained(n, c, t, dtype, chain_calls):
    *inputs, grad = _inputs(n, c, t, dtype)
    got = _run(_fused, inputs, grad)
    assert chain_calls == [n] * (SITES - 1)  # every site after the first chained
    want = _run(_reference, inputs, grad, torch.float64)
    unchained = _run(_fused, inputs, grad, chained=False)
    assert len(chain_calls) == SITES - 1
    tol = TOLERANCES[dtype]
    for index, (a, b, e) in enumerate(zip(got, unchained, want, strict=True)):
        rtol, atol = tol["stream" if index < 2 else "grad"]
        scale = e.abs().max().item()
        torch.testing.assert_close(a.double(), e, rtol=rtol, atol=atol * scale, msg=str(index))
        # The same kernels but for the order of fp32 sums (site A's coefficient gradients over
        # column blocks, d_fn over token splits): a few fp32 ulps of the largest entry; a bf16
        # tensor may round such a difference to one ulp (2^-8 relative) the other way.
        rtol = 2**-8 if a.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(a, b, rtol=rtol, atol=2e-6 * b.abs().max().item())
    # The last site's output: the forward is the same kernels, bit for bit.
    assert torch.equal(got[0], unchained[0])


def test_chained_is_bitwise_repeatable():
    *inputs, grad = _inputs(4, 80, 53, torch.bfloat16, seed=3)
    first, second = _run(_fused, inputs, grad), _run(_fused, inputs, grad)
    for index, (a, b) in enumerate(zip(first, second, strict=True)):
        assert torch.equal(a, b), index


def test_another_consumer_of_the_streams_unchains_correctly(chain_calls):
    """A loss on the streams between two sites adds to their gradient: the chained results
    (computed from site 1's dx alone) are dropped and site 0's exit runs its own backward."""
    *inputs, grad = _inputs(4, 48, 21, torch.float32, seed=4)

    def with_tap(*args, ops_ref=False):
        tap = []
        out = _reference(*args) if ops_ref else _fused(*args, tap=tap)
        if ops_ref:  # the same streams after site 0, from the reference
            fn, base, scale, w = args[1:5]
            h_pre, h_post, h_res = ops.mhc_coefficients(args[0], fn, base, scale)
            y = torch.tanh(ops.mhc_pre(args[0], h_pre)) * w
            tap.append(ops.mhc_post_res(args[0], y, h_post, h_res))
        return out + 0.5 * tap[0].sum()

    got = _run(with_tap, inputs, grad)
    assert len(chain_calls) == SITES - 1  # chained, then dropped at site 0's exit
    want = _run(lambda *a: with_tap(*a, ops_ref=True), inputs, grad, torch.float64)
    for index, (a, e) in enumerate(zip(got, want, strict=True)):
        rtol, atol = TOLERANCES[torch.float32]["stream" if index < 2 else "grad"]
        torch.testing.assert_close(
            a.double(), e, rtol=rtol, atol=atol * e.abs().max().item(), msg=str(index)
        )


def test_chaining_needs_the_previous_exit_and_n_at_most_4(chain_calls):
    # n = 8: above CHAIN_MAX_STREAMS, the sites run unchained (and still match).
    *inputs, grad = _inputs(8, 24, 11, torch.float32, seed=5)
    got = _run(_fused, inputs, grad)
    assert chain_calls == [] and not chain.chainable(8)
    want = _run(_reference, inputs, grad, torch.float64)
    torch.testing.assert_close(got[1].double(), want[1], rtol=1e-5, atol=1e-5 * want[1].abs().max())
    # A link whose exit did not produce x (here: a copy of its output) is not chained to.
    x, fn, base, scale, w = _inputs(4, 24, 5, torch.float32)[:5]
    x.requires_grad_()
    u, _, h_post, h_res, link = kernels.mhc_site_enter(x, fn, base, scale)
    out = kernels.mhc_site_exit(x, u * w, h_post, h_res, link)
    assert link.produced(out) and link.produced(out.flatten(-2).unflatten(-1, (4, 24)))
    assert not link.produced(out.clone()) and not link.produced(out.transpose(0, 1))
    u2, *_ = kernels.mhc_site_enter(out.clone(), fn, base, scale, after=link)
    u2.sum().backward()
    assert chain_calls == []
    # Modified in place after the exit (autograd refuses that with grad on; without, the
    # version counter moves): not the exit's output any more.
    u, _, h_post, h_res, link = kernels.mhc_site_enter(x, fn, base, scale)
    out = kernels.mhc_site_exit(x, u * w, h_post, h_res, link)
    with torch.no_grad():
        out.mul_(2.0)
    assert not link.produced(out)
    # An exit without a graph (no grad) keeps nothing for a chain.
    with torch.no_grad():
        _, _, h_post, h_res, link = kernels.mhc_site_enter(x, fn, base, scale)
        out = kernels.mhc_site_exit(x, u.detach(), h_post, h_res, link)
    assert link.exit_inputs is None and not link.produced(out)
