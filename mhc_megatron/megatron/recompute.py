"""Stage-aligned recompute of the n streams (mHC paper eq. 20).

Without it every site keeps its input streams ``x [s, b, n, C]`` (n times a plain residual) for
backward. With it, a block of consecutive layers keeps only

- the block's input streams ``x_0 [s, b, n, C]``,
- each site's branch output ``y [s, b, C]`` and its mixing coefficients ``h_post [s, b, n]``,
  ``h_res [s, b, n, n]`` (fp32, n + n*n values per token),

and backward rebuilds a site's input streams from them, ``x_{i+1} = h_res_i x_i + h_post_i y_i``,
without re-running attention or the MLP. The first site whose backward runs (the block's last)
rebuilds every input of the block once; each is released after its two uses.

A block never crosses a pipeline stage: the first layer of a stage (or of a virtual-pipeline
chunk) always starts one, because its input (the expanded embedding, or a p2p receive) carries
no block. The rebuilt streams are bitwise the forward's: the same ops on the same values.
"""

from __future__ import annotations

import math

import torch

RECOMPUTE_BLOCK_ATTRIBUTE = "_mhc_recompute_block"


def optimal_block_layers(num_streams: int, num_layers: int) -> float:
    """The paper's optimum block length ``sqrt(n * L / (n + 2))``."""
    return math.sqrt(num_streams * num_layers / (num_streams + 2))


class RecomputeBlock:
    """What one block of one forward pass (micro-batch) keeps for its backward.

    Args:
        x0: ``[s, b, n, C]`` the block's input streams.
        post_res: the ``mhc_post_res`` to rebuild with (torch ops or fused kernel).
        fused_site: :mod:`mhc_megatron.kernels.site` to run the sites on (their backward is
            called directly on the rebuilt streams, no forward re-run), or None (the ops are
            re-run under autograd in backward).
    """

    def __init__(self, x0: torch.Tensor, post_res, fused_site=None):
        self.post_res, self.fused_site = post_res, fused_site
        self.links: dict[int, object] = {}  # fused sites: index -> SiteLink
        self.layers = 0
        self._mixes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._streams: dict[int, torch.Tensor] = {0: x0.detach()}
        self._uses: dict[int, int] = {}

    def add_site(self, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor) -> int:
        """Records a site's branch output and coefficients; returns the site's index."""
        self._mixes.append((y.detach(), h_post.detach(), h_res.detach()))
        return len(self._mixes) - 1

    def streams(self, index: int) -> torch.Tensor:
        """The input streams of site ``index``, rebuilt from the nearest kept ones."""
        if index not in self._streams:
            start = max(i for i in self._streams if i < index)
            x = self._streams[start]
            with torch.no_grad():
                for i in range(start, index):
                    x = self.post_res(x, *self._mixes[i])
                    self._streams[i + 1] = x
        return self._streams[index]

    def release(self, index: int) -> None:
        """Frees site ``index``'s input streams after their second backward use.

        The two uses are post+res, then coefficients + pre-mix.
        """
        self._uses[index] = self._uses.get(index, 0) + 1
        if self._uses[index] == 2 and index > 0:  # the block input stays: rebuilds start there
            self._streams.pop(index, None)


class _SiteEnter(torch.autograd.Function):
    """Coefficients and pre-mix of one site, saving no streams: ``x -> (u, h_post, h_res)``."""

    @staticmethod
    def forward(ctx, x, fn, base, scale, coefficients, pre, block, index):
        h_pre, h_post, h_res = coefficients(x, fn, base, scale)
        ctx.save_for_backward(fn, base, scale)
        ctx.coefficients, ctx.pre, ctx.block, ctx.index = coefficients, pre, block, index
        return pre(x, h_pre), h_post, h_res

    @staticmethod
    def backward(ctx, du, dh_post, dh_res):
        x = ctx.block.streams(ctx.index).detach().requires_grad_(True)
        params = [p.detach().requires_grad_(True) for p in ctx.saved_tensors]
        with torch.enable_grad():
            h_pre, h_post, h_res = ctx.coefficients(x, *params)
            u = ctx.pre(x, h_pre)
        outputs = [(u, du), (h_post, dh_post), (h_res, dh_res)]
        outputs = [(t, g) for t, g in outputs if g is not None]
        grads = torch.autograd.grad(
            [t for t, _ in outputs], [x, *params], [g for _, g in outputs], allow_unused=True
        )
        ctx.block.release(ctx.index)
        return (*grads, None, None, None, None)


class _SiteExit(torch.autograd.Function):
    """Post + residual mix of one site, saving the branch output but not the streams."""

    @staticmethod
    def forward(ctx, x, y, h_post, h_res, post_res, block, index):
        ctx.save_for_backward(y, h_post, h_res)
        ctx.post_res, ctx.block, ctx.index = post_res, block, index
        return post_res(x, y, h_post, h_res)

    @staticmethod
    def backward(ctx, dout):
        x = ctx.block.streams(ctx.index).detach().requires_grad_(True)
        inputs = [t.detach().requires_grad_(True) for t in ctx.saved_tensors]
        with torch.enable_grad():
            out = ctx.post_res(x, *inputs)
        grads = torch.autograd.grad(out, [x, *inputs], dout)
        ctx.block.release(ctx.index)
        return (*grads, None, None, None)


class _FusedSiteEnter(torch.autograd.Function):
    """:class:`_SiteEnter` on the fused site kernels.

    Saves the coefficients' small state (fp32, ``O(n*n)`` a token), not the streams; backward
    calls the fused backward on the rebuilt streams, with nothing re-run.
    """

    @staticmethod
    def forward(ctx, x, fn, base, scale, site, block, index):
        fused, config = block.fused_site, site.config
        lead, (n, c) = x.shape[:-2], x.shape[-2:]
        x2 = x.reshape(-1, n * c).contiguous()
        u, h_pre, h_post, h_res, mixes, inv_rms = fused.enter_forward(
            x2, fn, base, scale, n, config.mhc_sinkhorn_iters, config.mhc_eps
        )
        site.observe(h_pre, h_post, h_res)
        block.links[index] = fused.SiteLink()
        # The previous site of the block chains its exit's backward into this dx pass.
        after = block.links.get(index - 1)
        ctx.after = after if after is not None and after.produced(x) else None
        ctx.save_for_backward(fn, base, scale, h_pre, h_res, mixes, inv_rms)
        ctx.block, ctx.index, ctx.shape = block, index, x.shape
        ctx.iters, ctx.eps = config.mhc_sinkhorn_iters, config.mhc_eps
        return u.view(*lead, c), h_post.view(*lead, n), h_res.view(*lead, n, n)

    @staticmethod
    def backward(ctx, du, g_post, g_res):
        block = ctx.block
        fn, base, scale, *saved = ctx.saved_tensors
        dx, dfn, dbase, dscale = block.fused_site.enter_backward(
            block.streams(ctx.index), fn, base, scale, saved, du, g_post, g_res,
            block.links.pop(ctx.index), ctx.iters, ctx.eps, after=ctx.after,
        )  # fmt: skip
        block.release(ctx.index)
        if ctx.after is not None and ctx.after.chained is not None:
            block.release(ctx.index - 1)  # the chained pass read the previous site's streams
        return dx, dfn, dbase, dscale, None, None, None


class _FusedSiteExit(torch.autograd.Function):
    """:class:`_SiteExit` on the fused site kernels: backward leaves ``dx`` to the enter's."""

    @staticmethod
    def forward(ctx, x, y, h_post, h_res, block, index):
        ctx.save_for_backward(y, h_post, h_res)
        ctx.block, ctx.index = block, index
        n, c = x.shape[-2:]

        def inputs(node):  # for the next site's chained backward (kernels.site)
            y_, h_post_, h_res_ = node.saved_tensors
            return (
                block.streams(index).reshape(-1, n * c), y_.reshape(-1, c),
                h_post_.reshape(-1, n), h_res_.reshape(-1, n, n),
            )  # fmt: skip

        block.fused_site.exit_saved(block.links[index], ctx, inputs)
        return block.post_res(x, y, h_post, h_res)

    @staticmethod
    def backward(ctx, dout):
        block = ctx.block
        shapes = [t.shape for t in ctx.saved_tensors]
        chained = block.fused_site.chained_exit_backward(block.links[ctx.index], dout, shapes)
        if chained is not None:  # the next site's backward did this one's: nothing to rebuild
            return None, *chained, None, None
        y, h_post, h_res = ctx.saved_tensors
        dy, dh_post, dh_res = block.fused_site.exit_backward(
            block.streams(ctx.index), y, h_post, h_res, dout, block.links[ctx.index]
        )
        block.release(ctx.index)
        return None, dy, dh_post, dh_res, None, None


def enter_site(block: RecomputeBlock, site, x: torch.Tensor, pre):
    """``(u, h_post, h_res, index)`` for a site whose input streams the block can rebuild.

    Args:
        block: the current block.
        site: the MHCSite (``site.coefficients(x, fn, base, scale)``).
        x: ``[s, b, n, C]`` input streams.
        pre: the ``mhc_pre`` to use.
    """
    index = len(block._mixes)
    if block.fused_site is not None:
        u, h_post, h_res = _FusedSiteEnter.apply(
            x, site.fn, site.base, site.scale, site, block, index
        )
    else:
        u, h_post, h_res = _SiteEnter.apply(
            x, site.fn, site.base, site.scale, site.coefficients, pre, block, index
        )
    return u, h_post, h_res, index


def exit_site(block: RecomputeBlock, x, y, h_post, h_res, index: int) -> torch.Tensor:
    """``[s, b, n, C]`` new streams; records ``y`` and the coefficients in the block."""
    recorded = block.add_site(y, h_post, h_res)
    assert recorded == index, "sites of a block must be entered and left in order"
    if block.fused_site is not None:
        out = _FusedSiteExit.apply(x, y, h_post, h_res, block, index)
        block.fused_site.exit_returned(block.links[index], out)
        return out
    return _SiteExit.apply(x, y, h_post, h_res, block.post_res, block, index)


def saved_activation_bytes(model: torch.nn.Module, step) -> int:
    """Bytes of activations one ``step()`` holds for backward.

    ``step`` is a forward whose graph is kept for backward. Counted: every tensor saved by
    autograd (saved-tensor hooks), plus the input streams the recompute blocks keep, each
    storage counted once and parameters not at all.

    Args:
        model: the model ``step`` runs (its parameters are excluded).
        step: callable running the forward; its return value is returned through the count's
            lifetime only (the graph is freed when the caller drops it).
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def count(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        count(t)
        return t

    def keep_block(module, args, output) -> None:
        block = getattr(
            output[0] if isinstance(output, tuple) else output, RECOMPUTE_BLOCK_ATTRIBUTE, None
        )
        if block is not None:
            count(block.streams(0))

    handles = [m.register_forward_hook(keep_block) for m in model.modules()]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = step()
    finally:
        for handle in handles:
            handle.remove()
    del result
    return sum(storages.values())
