"""One whole mHC site on the fused kernels, with a single ``dx`` pass in backward.

A site is ``(u, h_post, h_res) = enter(x)`` (coefficients and pre-mix), the branch ``y = F(u)``,
then ``x_next = exit(x, y, h_post, h_res)`` (post + residual mix). Built from the three separate
ops, autograd gets three gradients for ``x`` (coefficients, pre-mix, residual mix), each a full
``[T, n, C]`` tensor, and adds them in two more passes. Here the two halves share a
:class:`SiteLink`:

- ``exit``'s backward computes ``dy``, ``dh_post`` and ``dh_res`` (it reads ``dout``, ``x``,
  ``y``), returns no gradient for ``x`` and leaves ``dout`` on the link;
- ``enter``'s backward (it runs after, autograd's order: ``h_post`` and ``h_res`` feed ``exit``)
  reduces ``dh_pre`` (reads ``x``, ``du``), back-propagates the coefficients, and writes the
  site's whole ``dx = h_pre[j] du + sum_i h_res[i, j] dout[i] + (coefficient terms)`` in one
  pass, accumulated in fp32 and rounded once.

Sites in a row are chained: a site entered with ``after=`` the previous site's link (whose
exit produced its input streams) runs its ``dx`` pass together with that previous exit's
backward (:mod:`mhc_megatron.kernels.chain`), which then only hands over the results. The
previous exit's saved inputs are read through its autograd node (so saved-tensor hooks apply),
and the results are used only if the gradient autograd passes to that exit is the ``dx`` the
chain wrote (another consumer of the streams would have added to it): otherwise the exit's own
backward runs, so chaining never changes what is computed.

No atomics: every gradient is bitwise reproducible. The values match the separate ops (and so
:mod:`mhc_megatron.ops`) up to the rounding of the three partial ``dx`` to x's dtype, which
the fused pass skips.
"""

import math
import weakref

import torch

from mhc_megatron.kernels import chain as _chain
from mhc_megatron.kernels import coefficients as _coef
from mhc_megatron.kernels import post_res as _post_res
from mhc_megatron.kernels import pre as _pre

# How many view-like autograd nodes may stand between an exit's output and the next enter's
# input (in the mHC model: view, make_viewless_tensor, view).
_VIEW_DEPTH = 8


class SiteLink:
    """What the two halves of one site (and the next site's enter) pass each other in backward.

    Attributes:
        dout: ``[T, n*C]`` gradient of the site's output, left by the exit's backward for the
            enter's ``dx`` pass.
        exit_inputs: a callable returning the exit's inputs ``(x [T, n*C], y [T, C],
            h_post [T, n], h_res [T, n, n])`` while its backward has not run, else None.
        output: ``(data_ptr, shape, version)`` of the exit's output and ``exit_node`` (a weak
            reference to its autograd node), so the next enter can check that its input
            streams are that output, unmodified.
        chained: ``(dx, dx's version, dy, dh_post, dh_res)`` from the next site's chained
            backward: the exit's gradients, valid if its ``dout`` is ``dx``, unmodified.
    """

    __slots__ = ("dout", "exit_inputs", "output", "exit_node", "chained")

    def __init__(self):
        """Starts empty: every attribute None until the site's forward and backward fill it."""
        self.dout: torch.Tensor | None = None
        self.exit_inputs = None
        self.output: tuple | None = None
        self.exit_node = None
        self.chained: tuple | None = None

    def produced(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is this site's output streams, unmodified.

        That is: the same memory, shape and version, reached from the exit's autograd node
        through single-input (view) nodes only, and the exit kept its inputs. Anything else
        runs unchained.
        """
        if self.exit_inputs is None or not x.is_contiguous():
            return False
        if self.output != (x.data_ptr(), tuple(x.shape), x._version):
            return False
        node, fn = self.exit_node(), x.grad_fn
        for _ in range(_VIEW_DEPTH):
            if fn is None or fn is node:
                return fn is not None
            parents = [f for f, _ in fn.next_functions if f is not None]
            fn = parents[0] if len(parents) == 1 else None
        return False

    def take_chained(self, dout: torch.Tensor) -> tuple | None:
        """The exit's ``(dy, dh_post, dh_res)`` from the chained pass, or None.

        They are returned if ``dout`` is the ``dx`` the chained pass wrote (the only gradient
        of the streams), else None; releases both.
        """
        chained, self.chained = self.chained, None
        self.exit_inputs = self.exit_node = None
        if chained is None:
            return None
        dx, version, *grads = chained
        # Same memory and untouched since the chained pass wrote it: autograd adds another
        # consumer's gradient into a new tensor, or in place (which moves the version).
        same = dout.data_ptr() == dx.data_ptr() and dout.numel() == dx.numel()
        return tuple(grads) if same and dout._version == version and dout.is_contiguous() else None


def enter_forward(x2, fn, base, scale, n, iters, eps):
    """``(u [T, C], h_pre, h_post, h_res, mixes, inv_rms)`` of ``x2: [T, n*C]``."""
    h_pre, h_post, h_res, mixes, inv_rms, u = _coef._forward(
        x2, fn, base, scale, n, iters, eps, pre=True
    )
    return u, h_pre, h_post, h_res, mixes, inv_rms


def enter_backward(x, fn, base, scale, saved, du, g_post, g_res, link, iters, eps, after=None):
    """``(dx, dfn, dbase, dscale)``: the site's whole ``dx``, in ``x``'s shape.

    Args:
        x: ``[..., n, C]`` the site's input streams.
        fn: ``[N, n*C]`` the site's fp32 projection (``N = n*n + 2n``).
        base: ``[N]`` the site's fp32 static logits.
        scale: ``[3]`` the site's fp32 gating factors.
        saved: ``(h_pre [T, n], h_res [T, n, n], mixes [T, N], inv_rms [T])`` from
            :func:`enter_forward`.
        du: ``[..., C]`` gradient of the branch input ``u`` as autograd passes it (any shape
            with ``T`` leading elements, broadcast, or None).
        g_post: ``[..., n]`` gradient of ``h_post``, passed the same way as ``du``.
        g_res: ``[..., n, n]`` gradient of ``h_res``, passed the same way as ``du``.
        link: the site's :class:`SiteLink`; its ``dout`` (None if the exit's backward did not
            run) is used and released.
        iters: Sinkhorn iterations of the forward.
        eps: eps of the RMS, of ``h_pre`` and of the Sinkhorn denominators.
        after: the previous site's link, whose exit produced ``x`` (checked at the enter's
            forward), or None. Its exit's backward is done here, in the ``dx`` pass, and left
            on it (:meth:`SiteLink.take_chained`).
    """
    h_pre, h_res, mixes, inv_rms = saved
    (n, c), t = x.shape[-2:], h_pre.shape[0]
    x2 = x.reshape(t, n * c).contiguous()
    dout, link.dout = link.dout, None
    du = _dense(du, (t, c), x2.dtype, x2.device)
    _, g_pre = _pre.pre_backward(x2.view(t, n, c), h_pre, du, write_dx=False)
    dm, rms_coef, dbase, dscale = _coef._backward_coef(
        mixes, inv_rms, base, scale, g_pre, _dense(g_post, (t, n), device=x2.device),
        _dense(g_res, (t, n, n), device=x2.device), n * c, n, iters, eps,
    )  # fmt: skip
    site = (du, h_pre, h_res, dout)
    exit_inputs = after.exit_inputs() if after is not None and after.exit_inputs else None
    if exit_inputs is None:
        dx, dfn = _coef._backward_x(x2, fn, dm, rms_coef, n, site)
    else:
        dx, dfn, *grads = _chain.backward_x_chain(fn, dm, rms_coef, site, exit_inputs, n)
        after.chained = (dx, dx._version, *grads)
    return dx.view(x.shape), dfn, dbase, dscale


def chained_exit_backward(link: SiteLink, dout: torch.Tensor, shapes) -> tuple | None:
    """An exit's ``(dy, dh_post, dh_res)`` from the next site's chained pass, or None.

    The gradients come in ``shapes`` (those of ``y``, ``h_post``, ``h_res``) if the next site's
    chained pass computed them for this ``dout`` (:meth:`SiteLink.take_chained`), with ``dout``
    left on ``link`` for the enter's ``dx`` pass; None if the exit must run its own backward.
    """
    chained = link.take_chained(dout)
    if chained is None:
        return None
    link.dout = dout.reshape(-1, math.prod(dout.shape[-2:]))
    return tuple(g.view(shape) for g, shape in zip(chained, shapes, strict=True))


def exit_backward(x, y, h_post, h_res, dout, link):
    """``(dy, dh_post, dh_res)`` in the shapes of ``y``, ``h_post``, ``h_res``.

    ``dout`` goes on ``link`` for the enter's backward, which writes ``dx``.

    Args:
        x: ``[..., n, C]`` the site's input streams, the forward's input.
        y: ``[..., C]`` branch output, the forward's input.
        h_post: ``[..., n]``, the forward's input.
        h_res: ``[..., n, n]``, the forward's input.
        dout: ``[..., n, C]`` gradient of the site's output.
        link: the site's :class:`SiteLink`.
    """
    n, c = x.shape[-2:]
    t = x.numel() // (n * c)
    dout3 = dout.contiguous().view(t, n, c)
    _, dy, dh_post, dh_res = _post_res.post_res_backward(
        x.contiguous().view(t, n, c), y.contiguous().view(t, c), h_post.contiguous().view(t, n),
        h_res.contiguous().view(t, n, n), dout3, write_dx=False,
    )  # fmt: skip
    link.dout = dout3.view(t, n * c)
    return dy.view(y.shape), dh_post.view(h_post.shape), dh_res.view(h_res.shape)


def _flat_saved(node, t: int, k: int):
    """The exit inputs ``MHCSiteExitFunction`` saved, as the chained pass takes them."""
    x, y, h_post, h_res = node.saved_tensors
    return x.view(t, k), y, h_post, h_res


def _dense(g, shape, dtype=torch.float32, device=None):
    """A gradient as a contiguous tensor of ``shape``.

    Zeros for None; autograd may pass expanded stride-0 gradients of sums.
    """
    if g is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    return g.reshape(shape).contiguous()


def exit_saved(link: SiteLink, ctx, inputs) -> None:
    """Records on ``link`` the exit's autograd node ``ctx`` (weakly) and how to get its inputs.

    The inputs come from ``inputs(ctx)``, valid until the exit's backward, so that the next
    site can chain to it. Called in the exit's forward; :func:`exit_returned` completes it.
    """
    node = weakref.ref(ctx)  # not the tensors: they stay under autograd's saved-tensor hooks
    link.exit_node = node
    link.exit_inputs = lambda: None if node() is None else inputs(node())


def exit_returned(link: SiteLink, output: torch.Tensor) -> None:
    """Records the exit's output as autograd returned it, or forgets the exit.

    The exit is forgotten if the output has no backward (no grad mode, nothing requires grad)
    or cannot chain (n > 4).
    """
    if output.requires_grad and _chain.chainable(output.shape[-2]):
        link.output = (output.data_ptr(), tuple(output.shape), output._version)
    else:
        link.exit_inputs = link.exit_node = link.output = None


class MHCSiteEnterFunction(torch.autograd.Function):
    """``x -> (u, h_pre, h_post, h_res)``; see :func:`mhc_site_enter`."""

    @staticmethod
    def forward(ctx, x, fn, base, scale, iters, eps, link, after):
        """Coefficients and pre-mix of ``x: [..., n, C]`` in one launch.

        Saves what the backward needs, and keeps ``after`` only if ``x`` is that site's exit
        output, unmodified (:meth:`SiteLink.produced`).
        """
        lead, (n, c) = x.shape[:-2], x.shape[-2:]
        t = math.prod(lead)
        x2 = x.reshape(t, n * c).contiguous()
        u, h_pre, h_post, h_res, mixes, inv_rms = enter_forward(x2, fn, base, scale, n, iters, eps)
        ctx.save_for_backward(x2, fn, base, scale, h_pre, h_res, mixes, inv_rms)
        ctx.shape, ctx.iters, ctx.eps, ctx.link = x.shape, iters, eps, link
        ctx.after = after if after is not None and after.produced(x) else None
        outputs = (u.view(*lead, c), h_pre.view(*lead, n), h_post.view(*lead, n))
        ctx.mark_non_differentiable(outputs[1])  # marks the returned view itself
        return *outputs, h_res.view(*lead, n, n)

    @staticmethod
    def backward(ctx, du, _, g_post, g_res):
        """Gradients of ``(x, fn, base, scale)``: the site's whole ``dx`` in one pass.

        ``h_pre`` is non-differentiable, so its gradient (``_``) is ignored.
        """
        x2, fn, base, scale, *saved = ctx.saved_tensors
        dx, dfn, dbase, dscale = enter_backward(
            x2.view(ctx.shape), fn, base, scale, saved, du, g_post, g_res, ctx.link, ctx.iters,
            ctx.eps, after=ctx.after,
        )  # fmt: skip
        return dx, dfn, dbase, dscale, None, None, None, None


class MHCSiteExitFunction(torch.autograd.Function):
    """``(x, y, h_post, h_res) -> x_next``; see :func:`mhc_site_exit`."""

    @staticmethod
    def forward(ctx, x, y, h_post, h_res, link):
        """Post + residual mix ``x_next: [..., n, C]``; records the exit on ``link``."""
        lead, (n, c) = x.shape[:-2], x.shape[-2:]
        t = math.prod(lead)
        x3, y2 = x.contiguous().view(t, n, c), y.contiguous().view(t, c)
        hp, hr = h_post.contiguous().view(t, n), h_res.contiguous().view(t, n, n)
        out = _post_res.post_res_forward(x3, y2, hp, hr)
        ctx.save_for_backward(x3, y2, hp, hr)
        ctx.link, ctx.shapes = link, (x.shape, y.shape, h_post.shape, h_res.shape)
        exit_saved(link, ctx, lambda node: _flat_saved(node, t, n * c))
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dout):
        """Gradients of ``(y, h_post, h_res)``; none for ``x``, which the enter's backward writes.

        Taken from the next site's chained pass if it computed them for this ``dout``, else
        computed here; either way ``dout`` is left on ``link`` for the enter's ``dx`` pass.
        """
        chained = chained_exit_backward(ctx.link, dout, ctx.shapes[1:])
        if chained is not None:
            return None, *chained, None
        views = [t.view(shape) for t, shape in zip(ctx.saved_tensors, ctx.shapes, strict=True)]
        dy, dh_post, dh_res = exit_backward(*views, dout, ctx.link)
        # No gradient for x here: the enter's backward writes all of it, this dout included.
        return None, dy, dh_post, dh_res, None


def mhc_site_enter(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    iters: int = 20,
    eps: float = 1e-6,
    deterministic: bool = False,
    after: SiteLink | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, SiteLink]:
    """Coefficients and branch input of one site; pair with :func:`mhc_site_exit`.

    Same values as ``ops.mhc_coefficients`` followed by ``ops.mhc_pre``.

    Args:
        x: ``[..., n, C]`` streams (bf16, fp16 or fp32), ``n <= 8``.
        fn: ``[n*n + 2n, n*C]`` the site's fp32 projection, as in ``kernels.mhc_coefficients``.
        base: ``[n*n + 2n]`` the site's fp32 static logits, as in ``kernels.mhc_coefficients``.
        scale: ``[3]`` the site's fp32 gating factors, as in ``kernels.mhc_coefficients``.
        iters: Sinkhorn iterations, ``>= 1``.
        eps: eps of the RMS, of ``h_pre`` and of the Sinkhorn denominators.
        deterministic: accepted for ``--deterministic-mode``; no atomics are used.
        after: the link of the site whose :func:`mhc_site_exit` returned ``x``: the two
            backward passes then run chained (module docstring). Ignored if ``x`` is not that
            output, or for ``n`` above ``chain.CHAIN_MAX_STREAMS``.

    Returns:
        ``(u [..., C] in x's dtype, h_pre [..., n], h_post [..., n], h_res [..., n, n], link)``,
        coefficients fp32. ``h_pre`` is for inspection (diagnostics): it carries no gradient,
        its effect reaches the parameters through ``u``. Pass ``link`` to the site's
        :func:`mhc_site_exit`, with the same ``x``.

    Raises:
        ValueError: as ``kernels.mhc_coefficients``.
    """
    del deterministic
    _coef._check(x, fn, base, scale, iters)
    link = SiteLink()
    u, h_pre, h_post, h_res = MHCSiteEnterFunction.apply(
        x, fn.contiguous(), base.contiguous(), scale.contiguous(), int(iters), float(eps), link,
        after,
    )  # fmt: skip
    return u, h_pre, h_post, h_res, link


def mhc_site_exit(
    x: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor, link: SiteLink
) -> torch.Tensor:
    """New streams ``x_next[i] = sum_j h_res[i, j] x[j] + h_post[i] y``, as ``ops.mhc_post_res``.

    Args:
        x: ``[..., n, C]``, the same streams given to :func:`mhc_site_enter`.
        y: ``[..., C]`` branch output.
        h_post: ``[..., n]`` from :func:`mhc_site_enter`.
        h_res: ``[..., n, n]`` from :func:`mhc_site_enter`.
        link: from :func:`mhc_site_enter`.

    Returns:
        ``[..., n, C]`` in x's dtype. Its gradient for ``x`` reaches ``x`` through the enter.
    """
    _post_res._check_inputs(x, y, h_post, h_res)
    out = MHCSiteExitFunction.apply(x, y, h_post, h_res, link)
    exit_returned(link, out)
    return out
