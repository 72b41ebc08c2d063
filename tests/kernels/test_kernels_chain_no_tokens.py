"""Fused sites in a row with chained backward passes (``kernels.chain``) on an empty batch: two
sites with no tokens, the second entered ``after=`` the first's link, run forward and backward:
the input's gradient has its shape and the projection's is zero. The chained sites on real
shapes, against the reference, are in ``tests/kernels/test_kernels_chain.py``."""

import torch

from mhc_megatron.kernels import site

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_no_tokens_chained():
    x = torch.zeros(0, 4, 16, device=DEVICE, requires_grad=True)
    fn = torch.randn(24, 64, device=DEVICE, requires_grad=True)
    base, scale = torch.zeros(24, device=DEVICE), torch.ones(3, device=DEVICE)
    link = None
    out = x
    for _ in range(2):
        u, _, h_post, h_res, new = site.mhc_site_enter(out, fn, base, scale, after=link)
        out, link = site.mhc_site_exit(out, u, h_post, h_res, new), new
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(fn.grad, torch.zeros_like(fn))
