"""Two sites chained in backward: site B's ``dx`` pass fused with site A's exit backward.

One pass writes site B's ``dx`` and does the backward of the residual mix (exit) of site A, the
site whose output streams B reads.

In a model, site A's exit ``x_B = exit_A(x_A, y_A)`` feeds site B, and autograd runs B's enter
backward (the ``dx`` pass of :mod:`mhc_megatron.kernels.site`) and then A's exit backward, which
reads B's ``dx`` back as its ``dout``. Per site separately that is (``S`` = one stream,
``T*C`` elements, ``n`` streams)::

    B's dx pass:      read x_B (n S), du_B (S), dout_B (n S); write dx_B (n S)
    A's exit bwd:     read dx_B (n S), x_A (n S), y_A (S);    write dy_A (S)

:func:`backward_x_chain` does both in one pass and reads neither ``x_B`` nor ``dx_B``: ``x_B``
is rebuilt in registers from ``x_A`` and ``y_A`` exactly as A's exit forward computed it (same
fp32 operations in the same order, then the same rounding), and ``dx_B`` is used where it is
computed. Per token it moves ``(3n + 3) S`` plus site A's coefficient partials instead of
``(6n + 4) S``: ``4n + 1`` fewer stream-sized transfers.

A program owns a block of ``BC`` columns of every stream (``n * BC`` columns of ``x``), for a
range of tokens, so it holds all ``n`` streams of ``dx_B`` at once (``dy_A`` sums over them)
and still accumulates B's ``d_fn`` for its columns over the tokens in registers, as the single
site's pass does. A's ``dh_post`` and ``dh_res`` reduce over all ``C`` columns: each column
block writes its partial sums (``n + n*n`` fp32 a token) and a fixed-order ``torch.sum`` adds
them. No atomics: every result is bitwise reproducible.
"""

import torch
import triton
import triton.language as tl

from mhc_megatron.kernels.coefficients import _dot, _layout, _row_groups, _tile, _token_splits

CHAIN_MAX_STREAMS = 4
"""Largest n chained: the program holds ``n * BC`` columns of ``fn`` and ``d_fn``
(``n*n + 2n`` rows each) in registers; at n = 8 they would spill, and sites run unchained."""


@triton.jit
def _bwd_x_chain_kernel(fn_ptr, dm_ptr, rms_coef_ptr, du_ptr, h_pre_ptr, h_res_ptr, dout_ptr,
                        dx_ptr, part_fn_ptr, xa_ptr, ya_ptr, post_a_ptr, res_a_ptr, dy_a_ptr,
                        part_post_ptr, part_res_ptr, T, C, tokens_per_split, n: tl.constexpr,
                        NP: tl.constexpr, W2: tl.constexpr, P: tl.constexpr, BT: tl.constexpr,
                        BC: tl.constexpr, MODE_DX: tl.constexpr, MODE_DFN: tl.constexpr,
                        HAS_DOUT: tl.constexpr):  # fmt: skip
    N: tl.constexpr = n * n + 2 * n  # site B's coefficient rows
    K = n * C
    cb = tl.program_id(0)
    split = tl.program_id(1)
    # The streams' tiles are [BT, NP, BC] (token, stream j, column); the MMAs with fn see them
    # as [BT, NP * BC], column q = (j, c): [stream 0 | stream 1 | ...].
    q = tl.arange(0, NP * BC)
    kk = (q // BC) * C + cb * BC + q % BC
    q_mask = (q // BC < n) & (cb * BC + q % BC < C)
    c = cb * BC + tl.arange(0, BC)
    c_mask = c < C
    jj = tl.arange(0, NP)
    j_mask = jj < n
    pp, pp_mask, res, res_mask = _row_groups(n, W2, P)
    f_pp = _tile(fn_ptr, pp, pp_mask, kk, q_mask, K)
    f_res = _tile(fn_ptr, res, res_mask, kk, q_mask, K)
    dfn_pp = tl.zeros((W2, NP * BC), dtype=tl.float32)
    dfn_res = tl.zeros((P * P, NP * BC), dtype=tl.float32)
    part_post = part_post_ptr + cb.to(tl.int64) * T * n  # this column block's partials
    part_res = part_res_ptr + cb.to(tl.int64) * T * (n * n)
    t_start = split * tokens_per_split
    t_end = tl.minimum(t_start + tokens_per_split, T)
    for t0 in range(t_start, t_end, BT):
        t = t0 + tl.arange(0, BT)
        t_mask = t < t_end
        t64 = t.to(tl.int64)
        tc_mask = t_mask[:, None] & c_mask[None, :]
        tj_mask = t_mask[:, None] & j_mask[None, :]
        # x_B rebuilt as _post_res_fwd_kernel computes site A's output: h_post * y first, then
        # + h_res[j, m] x[m] for m in order, in fp32, rounded to the streams' dtype.
        y_a = tl.load(ya_ptr + t64[:, None] * C + c[None, :], mask=tc_mask, other=0.0)
        y_a = y_a.to(tl.float32)[:, None, :]
        post_a = tl.load(post_a_ptr + t64[:, None] * n + jj[None, :], mask=tj_mask, other=0.0)
        post_a = post_a[:, :, None]
        x_b = post_a * y_a
        for m in tl.static_range(n):
            h = tl.load(res_a_ptr + t64[:, None] * (n * n) + jj[None, :] * n + m, mask=tj_mask,
                        other=0.0)  # fmt: skip
            x_m = tl.load(xa_ptr + t64[:, None] * K + m * C + c[None, :], mask=tc_mask, other=0.0)
            x_b += h[:, :, None] * x_m.to(tl.float32)[:, None, :]
        x_b = x_b.to(dx_ptr.dtype.element_ty).to(tl.float32)

        # Site B's dx, term by term in the single site's order (kernels.coefficients).
        coef = tl.load(rms_coef_ptr + t, mask=t_mask, other=0.0)
        h_pre = tl.load(h_pre_ptr + t64[:, None] * n + jj[None, :], mask=tj_mask, other=0.0)
        du = tl.load(du_ptr + t64[:, None] * C + c[None, :], mask=tc_mask, other=0.0)
        acc = coef[:, None, None] * x_b
        acc += h_pre[:, :, None] * du.to(tl.float32)[:, None, :]
        if HAS_DOUT:
            for i in tl.static_range(n):
                h_ij = tl.load(h_res_ptr + t64[:, None] * (n * n) + i * n + jj[None, :],
                               mask=tj_mask, other=0.0)  # fmt: skip
                d_i = tl.load(dout_ptr + t64[:, None] * K + i * C + c[None, :], mask=tc_mask,
                              other=0.0)  # fmt: skip
                acc += h_ij[:, :, None] * d_i.to(tl.float32)[:, None, :]
        dm_pp = _tile(dm_ptr, t64, t_mask, pp, pp_mask, N)
        dm_res = _tile(dm_ptr, t64, t_mask, res, res_mask, N)
        dx = _dot(dm_pp, f_pp, tl.reshape(acc, (BT, NP * BC)), MODE_DX)
        dx = _dot(dm_res, f_res, dx, MODE_DX)
        dx = dx.to(dx_ptr.dtype.element_ty)
        q_rows = t_mask[:, None] & q_mask[None, :]
        tl.store(dx_ptr + t64[:, None] * K + kk[None, :], dx, mask=q_rows)
        x_b = tl.reshape(x_b, (BT, NP * BC))
        dfn_pp = _dot(tl.trans(dm_pp), x_b, dfn_pp, MODE_DFN)
        dfn_res = _dot(tl.trans(dm_res), x_b, dfn_res, MODE_DFN)

        # Site A's exit backward with dout_A = dx_B as stored (autograd would hand over the
        # rounded tensor): dy = sum_j h_post[j] dout[j]; partials over this column block of
        # dh_post[j] = <dout[j], y> and dh_res[j, m] = <dout[j], x[m]>.
        g = tl.reshape(dx.to(tl.float32), (BT, NP, BC))  # 0 where masked: every term loaded 0
        dy = tl.sum(post_a * g, axis=1)
        tl.store(dy_a_ptr + t64[:, None] * C + c[None, :], dy.to(dy_a_ptr.dtype.element_ty),
                 mask=tc_mask)  # fmt: skip
        tl.store(part_post + t64[:, None] * n + jj[None, :], tl.sum(g * y_a, axis=2), mask=tj_mask)
        for m in tl.static_range(n):
            x_m = tl.load(xa_ptr + t64[:, None] * K + m * C + c[None, :], mask=tc_mask, other=0.0)
            dh_res = tl.sum(g * x_m.to(tl.float32)[:, None, :], axis=2)  # [BT, NP]: row j
            tl.store(part_res + t64[:, None] * (n * n) + jj[None, :] * n + m, dh_res, mask=tj_mask)
    part = part_fn_ptr + split.to(tl.int64) * N * K
    tl.store(part + pp[:, None] * K + kk[None, :], dfn_pp, mask=pp_mask[:, None] & q_mask[None, :])
    tl.store(
        part + res[:, None] * K + kk[None, :], dfn_res, mask=res_mask[:, None] & q_mask[None, :]
    )


def chainable(n: int) -> bool:
    """Whether two sites with ``n`` streams can run :func:`backward_x_chain`."""
    return 1 <= n <= CHAIN_MAX_STREAMS


def backward_x_chain(fn, dm, rms_coef, site, chain, n):
    """Site B's ``dx`` and ``d_fn``, and site A's exit gradients, in one pass.

    Args:
        fn: ``[N, n*C]`` site B's projection (``N = n*n + 2n``).
        dm: ``[T, N]`` gradient of site B's raw coefficients, from site B's coefficient
            backward (``kernels.coefficients._backward_coef``).
        rms_coef: ``[T]`` per-token RMS factor from the same coefficient backward.
        site: ``(du [T, C], h_pre [T, n], h_res [T, n, n], dout [T, n*C] or None)`` of site B,
            as ``kernels.coefficients._backward_x`` takes them.
        chain: ``(x [T, n*C], y [T, C], h_post [T, n], h_res [T, n, n])``, site A's exit
            inputs; its output is site B's input streams.
        n: streams.

    Returns:
        ``(dx_B [T, n*C] in x's dtype, d_fn_B [N, n*C], dy_A [T, C] in y's dtype,
        dh_post_A [T, n], dh_res_A [T, n, n])``, the last two fp32.
    """
    x_a, y_a, post_a, res_a = chain
    du, h_pre, h_res, dout = site
    t, k = x_a.shape
    c = k // n
    rows = n * n + 2 * n
    w2, p = _layout(n)
    np_ = triton.next_power_of_2(n)
    bc = 256 // np_  # n * BC columns of fn and d_fn in registers (CHAIN_MAX_STREAMS)
    bt = 16
    f32 = dict(device=x_a.device, dtype=torch.float32)
    c_blocks = triton.cdiv(c, bc)
    splits, per_split = _token_splits(t, bt, c_blocks, x_a.device)
    dx = torch.empty_like(x_a)
    dy = torch.empty_like(y_a)
    if t == 0:  # nothing to sum: every gradient is empty or zero
        dh_post, dh_res = torch.zeros(0, n, **f32), torch.zeros(0, n, n, **f32)
        return dx, torch.zeros(rows, k, **f32), dy, dh_post, dh_res
    part_fn = torch.empty(splits, rows, k, **f32)
    part_post, part_res = torch.empty(c_blocks, t, n, **f32), torch.empty(c_blocks, t, n, n, **f32)
    exact = x_a.dtype != torch.float32
    _bwd_x_chain_kernel[(c_blocks, splits)](
        fn, dm, rms_coef, du, h_pre, h_res, x_a if dout is None else dout, dx, part_fn, x_a, y_a,
        post_a, res_a, dy, part_post, part_res, t, c, per_split, n=n, NP=np_, W2=w2, P=p, BT=bt,
        BC=bc,
        MODE_DX="tf32x3", MODE_DFN="split_a" if exact else "tf32x3", HAS_DOUT=dout is not None,
        num_warps=8, num_stages=1,  # 255 registers, no spills (compile_sm90)
    )  # fmt: skip
    # Fixed-order sums over the column blocks and the token splits: deterministic.
    dh_post, dh_res = (p[0] if c_blocks == 1 else p.sum(0) for p in (part_post, part_res))
    dfn = part_fn[0] if splits == 1 else part_fn.sum(0)
    return dx, dfn, dy, dh_post, dh_res
