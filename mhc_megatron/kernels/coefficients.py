"""Fused Triton kernels of the mHC coefficients (``docs/mhc-spec.md`` section 1).

Forward and backward, matching :func:`mhc_megatron.ops.mhc_coefficients`.

Per token ``x: [n*C]`` (fp32 math), with ``N = n*n + 2n`` rows of ``fn`` ordered
``[pre (n) | post (n) | res (n*n)]``::

    mixes  = (x @ fn.T) * rsqrt(mean(x*x) + eps)                     # [N]
    h_pre  = sigmoid(scale[0] * mixes[:n] + base[:n]) + eps          # [n]
    h_post = 2 * sigmoid(scale[1] * mixes[n:2n] + base[n:2n])        # [n]
    h_res  = sinkhorn(reshape(scale[2] * mixes[2n:] + base[2n:], n, n))

Kernels (all tokens flattened to ``T`` rows, ``K = n*C``):

* ``_fwd_kernel``: one pass over ``x: [T, K]`` per block of tokens computes the projection and the
  sum of squares together, then the gates and the Sinkhorn iterations in registers. It keeps
  ``mixes: [T, N]`` and ``inv_rms: [T]`` (fp32, ``4*(N+1)`` bytes a token against ``2*K`` of bf16
  ``x``) for the backward.
* ``_bwd_coef_kernel``: per block of tokens, re-runs the Sinkhorn iterations (their ``2n``
  denominators per iteration go to a small scratch buffer), back-propagates through them and the
  gates, and writes ``d_mixes * inv_rms: [T, N]``, the RMS term of ``d_x: [T]`` and per-block
  partial sums of ``d_base`` and ``d_scale``. It never reads ``x``.
* ``_bwd_x_kernel``: one pass over ``x`` per block of columns: ``d_x`` and per-split partial sums
  of ``d_fn = (d_mixes * inv_rms).T @ x``.

No kernel uses atomics: every weight gradient is a fixed-order sum of per-block partials, so the
results are bitwise reproducible run to run whether or not ``deterministic`` is set.
"""

import functools

import torch
import triton
import triton.language as tl

from mhc_megatron.kernels._common import check_num_streams


@triton.jit
def _tf32_head(v):
    # The 10 mantissa bits a tf32 MMA reads; v - head is the exact tail.
    return (v.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, acc, MODE: tl.constexpr):
    # bf16/fp16 values are exact in tf32, so a product with them needs only the other operand
    # split into a tf32 head and tail: 2 MMAs, ~2^-21 relative. fp32 x fp32 takes tf32x3 (3).
    if MODE == "split_b":  # a is tf32-exact
        b_hi = _tf32_head(b)
        acc = tl.dot(a, b_hi, acc, input_precision="tf32")
        acc = tl.dot(a, b - b_hi, acc, input_precision="tf32")
    elif MODE == "split_a":  # b is tf32-exact
        a_hi = _tf32_head(a)
        acc = tl.dot(a_hi, b, acc, input_precision="tf32")
        acc = tl.dot(a - a_hi, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision="tf32x3")
    return acc


@triton.jit
def _row_groups(n: tl.constexpr, W2: tl.constexpr, P: tl.constexpr):
    """Rows of ``fn`` (= columns of ``mixes``) in the two register layouts.

    ``[pre | post]`` padded to ``W2``, and ``res`` as a ``P x P`` matrix flattened row-major.
    """
    pp = tl.arange(0, W2)
    r = tl.arange(0, P * P)
    i = r // P
    j = r % P
    return pp, pp < 2 * n, 2 * n + i * n + j, (i < n) & (j < n)


@triton.jit
def _tile(ptr, rows, row_mask, cols, col_mask, stride):
    """The ``[len(rows), len(cols)]`` fp32 tile at ``ptr + rows * stride + cols``.

    Entries outside ``row_mask`` and ``col_mask`` are 0.
    """
    return tl.load(
        ptr + rows[:, None] * stride + cols[None, :],
        mask=row_mask[:, None] & col_mask[None, :],
        other=0.0,
    )


@triton.jit
def _sinkhorn(
    logits,
    valid,
    eps,
    iters,
    den_ptr,
    den_offs,
    BT: tl.constexpr,
    P: tl.constexpr,
    SAVE: tl.constexpr,
):
    """Sinkhorn of ``logits: [BT, P, P]`` (entries outside ``valid`` are padding).

    With ``SAVE``, iteration ``k`` stores its column and row denominators ``[BT, P]`` at
    ``den_ptr + (2k, 2k+1) * BT*P + den_offs``. Returns ``(M, max)``.
    """
    logits = tl.where(valid, logits, float("-inf"))  # padding: exp(-inf) = 0
    mx = tl.max(tl.max(logits, axis=2), axis=1)
    m = tl.exp(logits - mx[:, None, None])
    for k in range(iters):
        dc = tl.sum(m, axis=1) + eps  # column sums (over rows i)
        m = m * (1.0 / dc)[:, None, :]
        dr = tl.sum(m, axis=2) + eps
        m = m * (1.0 / dr)[:, :, None]
        if SAVE:
            tl.store(den_ptr + (2 * k) * BT * P + den_offs, dc)
            tl.store(den_ptr + (2 * k + 1) * BT * P + den_offs, dr)
    return m, mx


@triton.jit
def _fwd_kernel(x_ptr, fn_ptr, base_ptr, scale_ptr, h_pre_ptr, h_post_ptr, h_res_ptr, mixes_ptr,
                inv_rms_ptr, u_ptr, T, K, iters, eps, n: tl.constexpr, W2: tl.constexpr,
                P: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, MODE: tl.constexpr,
                PRE: tl.constexpr):  # fmt: skip
    N: tl.constexpr = n * n + 2 * n
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    t_mask = t < T
    t64 = t.to(tl.int64)  # T * K can pass 2^31
    pp, pp_mask, res, res_mask = _row_groups(n, W2, P)
    acc_pp = tl.zeros((BT, W2), dtype=tl.float32)
    acc_res = tl.zeros((BT, P * P), dtype=tl.float32)
    sumsq = tl.zeros((BT,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        k_mask = kk < K
        x = tl.load(
            x_ptr + t64[:, None] * K + kk[None, :],
            mask=t_mask[:, None] & k_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        sumsq += tl.sum(x * x, axis=1)
        f_pp = tl.load(
            fn_ptr + pp[:, None] * K + kk[None, :],
            mask=pp_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        acc_pp = _dot(x, tl.trans(f_pp), acc_pp, MODE)
        f_res = tl.load(
            fn_ptr + res[:, None] * K + kk[None, :],
            mask=res_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        acc_res = _dot(x, tl.trans(f_res), acc_res, MODE)
    # The RMS scales the finished projection (linearity), so x is read only once.
    inv_rms = tl.rsqrt(sumsq / K + eps)
    tl.store(inv_rms_ptr + t, inv_rms, mask=t_mask)
    m_pp = acc_pp * inv_rms[:, None]
    m_res = acc_res * inv_rms[:, None]
    tl.store(mixes_ptr + t64[:, None] * N + pp[None, :], m_pp, mask=t_mask[:, None] & pp_mask)
    tl.store(mixes_ptr + t64[:, None] * N + res[None, :], m_res, mask=t_mask[:, None] & res_mask)

    is_pre = pp < n
    z = tl.where(is_pre, tl.load(scale_ptr), tl.load(scale_ptr + 1)) * m_pp + tl.load(
        base_ptr + pp, mask=pp_mask, other=0.0
    )
    sig = tl.sigmoid(z)
    h_pre = sig + eps
    tl.store(h_pre_ptr + t64[:, None] * n + pp[None, :], h_pre, mask=t_mask[:, None] & is_pre)
    tl.store(
        h_post_ptr + t64[:, None] * n + (pp[None, :] - n),
        2.0 * sig,
        mask=t_mask[:, None] & pp_mask & ~is_pre,
    )

    logits = tl.load(scale_ptr + 2) * m_res + tl.load(base_ptr + res, mask=res_mask, other=0.0)
    logits = tl.reshape(logits, (BT, P, P))
    i = tl.arange(0, P)[None, :, None]
    j = tl.arange(0, P)[None, None, :]
    valid = (i < n) & (j < n)
    h, _ = _sinkhorn(logits, valid, eps, iters, h_res_ptr, 0, BT, P, False)
    tl.store(
        h_res_ptr + t64[:, None, None] * (n * n) + i * n + j, h, mask=t_mask[:, None, None] & valid
    )
    if PRE:
        # The site's pre-mix u = sum_j h_pre[j] x[j], from this block's tokens just read above
        # (the same launch: the fused site reads x once before the branch).
        C = K // n
        for c0 in range(0, C, BK):
            cc = c0 + tl.arange(0, BK)
            uc_mask = t_mask[:, None] & (cc < C)[None, :]
            u = tl.zeros((BT, BK), dtype=tl.float32)
            for s in tl.static_range(n):
                h_s = tl.sum(tl.where(pp[None, :] == s, h_pre, 0.0), axis=1)  # [BT]
                x_s = tl.load(
                    x_ptr + t64[:, None] * K + s * C + cc[None, :], mask=uc_mask, other=0.0
                )
                u += h_s[:, None] * x_s.to(tl.float32)
            tl.store(
                u_ptr + t64[:, None] * C + cc[None, :], u.to(u_ptr.dtype.element_ty), mask=uc_mask
            )


@triton.jit
def _bwd_coef_kernel(mixes_ptr, inv_rms_ptr, base_ptr, scale_ptr, g_pre_ptr, g_post_ptr,
                     g_res_ptr, dm_ptr, rms_coef_ptr, part_ptr, scratch_ptr,
                     T, K, iters, eps, n: tl.constexpr, W2: tl.constexpr, P: tl.constexpr,
                     BT: tl.constexpr):  # fmt: skip
    N: tl.constexpr = n * n + 2 * n
    pid = tl.program_id(0)
    t = pid * BT + tl.arange(0, BT)
    t_mask = t < T
    t64 = t.to(tl.int64)
    inv_rms = tl.load(inv_rms_ptr + t, mask=t_mask, other=1.0)
    s_pre = tl.load(scale_ptr)
    s_post = tl.load(scale_ptr + 1)
    s_res = tl.load(scale_ptr + 2)

    # Gates: d sigmoid = sig * (1 - sig); h_post carries a factor 2.
    pp = tl.arange(0, W2)[None, :]
    is_pre = pp < n
    pp_mask = t_mask[:, None] & (pp < 2 * n)
    m_pp = tl.load(mixes_ptr + t64[:, None] * N + pp, mask=pp_mask, other=0.0)
    g_pp = tl.load(g_pre_ptr + t64[:, None] * n + pp, mask=pp_mask & is_pre, other=0.0)
    g_pp += tl.load(g_post_ptr + t64[:, None] * n + (pp - n), mask=pp_mask & ~is_pre, other=0.0)
    s_pp = tl.where(is_pre, s_pre, s_post)
    sig = tl.sigmoid(s_pp * m_pp + tl.load(base_ptr + pp, mask=pp < 2 * n, other=0.0))
    dz_pp = tl.where(is_pre, 1.0, 2.0) * g_pp * sig * (1.0 - sig)

    # Sinkhorn: re-run forward (saving the 2n denominators per iteration, not the matrices),
    # then walk back, rebuilding each iteration's input from its output and denominators.
    i = tl.arange(0, P)[None, :, None]
    j = tl.arange(0, P)[None, None, :]
    valid = (i < n) & (j < n)
    res_mask = t_mask[:, None, None] & valid
    res_col = 2 * n + i * n + j
    m_res = tl.load(mixes_ptr + t64[:, None, None] * N + res_col, mask=res_mask, other=0.0)
    logits = s_res * m_res + tl.load(base_ptr + res_col, mask=valid, other=0.0)
    den_ptr = scratch_ptr + pid.to(tl.int64) * (2 * iters * BT * P)
    den_offs = tl.arange(0, BT)[:, None] * P + tl.arange(0, P)[None, :]
    b, mx = _sinkhorn(logits, valid, eps, iters, den_ptr, den_offs, BT, P, True)
    tl.debug_barrier()  # the scratch is re-read below, possibly by other threads of the block
    gb = tl.load(g_res_ptr + t64[:, None, None] * (n * n) + i * n + j, mask=res_mask, other=0.0)
    # The walk back carries q = g * value, the gradient with respect to the log of each
    # iteration's matrix: for out = y / (sum(y) + eps), q_y = q_out - out * sum(q_out). Its
    # Jacobian has entries in [0, 1]; the gradient with respect to the values themselves is
    # divided by a denominator at every step, and underflowed rows or columns (denominator eps)
    # overflow it to inf (ops.sinkhorn's docstring).
    q = tl.where(valid, gb * b, 0.0)
    for it in range(iters):
        k = iters - 1 - it
        dc = tl.load(den_ptr + (2 * k) * BT * P + den_offs)[:, None, :]
        dr = tl.load(den_ptr + (2 * k + 1) * BT * P + den_offs)[:, :, None]
        # b = a / dr (rows), a = x / dc (columns).
        a = b * dr
        q = tl.where(valid, q - b * tl.sum(q, axis=2)[:, :, None], 0.0)
        q = q - a * tl.sum(q, axis=1)[:, None, :]
        b = a * dc
    # q is now the gradient with respect to L - max: the max takes minus the whole sum, split
    # evenly between ties (as torch.amax).
    is_max = valid & (logits == mx[:, None, None])
    n_max = tl.sum(tl.sum(is_max.to(tl.float32), axis=2), axis=1)
    shift = tl.sum(tl.sum(q, axis=2), axis=1) / n_max
    dz_res = tl.where(res_mask, q - tl.where(is_max, shift[:, None, None], 0.0), 0.0)

    # mixes = raw * inv_rms, d inv_rms / d x = -inv_rms^3 * x / K.
    dm_pp = s_pp * dz_pp
    dm_res = s_res * dz_res
    dot = tl.sum(dm_pp * m_pp, axis=1) + tl.sum(tl.sum(dm_res * m_res, axis=2), axis=1)
    tl.store(rms_coef_ptr + t, -inv_rms * inv_rms * dot / K, mask=t_mask)
    tl.store(dm_ptr + t64[:, None] * N + pp, dm_pp * inv_rms[:, None], mask=pp_mask)
    tl.store(
        dm_ptr + t64[:, None, None] * N + res_col, dm_res * inv_rms[:, None, None], mask=res_mask
    )

    # Per-block partial sums of d_base (N) and d_scale (3) in one row of N + 3, reduced in a
    # fixed order on the host.
    part = part_ptr + pid * (N + 3)
    tl.store(part + pp, tl.sum(dz_pp, axis=0)[None, :], mask=pp < 2 * n)
    tl.store(part + res_col, tl.sum(dz_res, axis=0)[None, :, :], mask=valid)
    dzm = dz_pp * m_pp
    tl.store(part + N, tl.sum(tl.sum(tl.where(is_pre, dzm, 0.0), axis=1)))
    tl.store(part + N + 1, tl.sum(tl.sum(tl.where(is_pre, 0.0, dzm), axis=1)))
    tl.store(part + N + 2, tl.sum(tl.sum(tl.sum(dz_res * m_res, 2), 1)))


@triton.jit
def _bwd_x_kernel(x_ptr, fn_ptr, dm_ptr, rms_coef_ptr, dx_ptr, part_fn_ptr, du_ptr, h_pre_ptr,
                  h_res_ptr, dout_ptr, T, C, tokens_per_split, n: tl.constexpr, W2: tl.constexpr,
                  P: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, MODE_DX: tl.constexpr,
                  MODE_DFN: tl.constexpr, SITE: tl.constexpr,
                  HAS_DOUT: tl.constexpr):  # fmt: skip
    N: tl.constexpr = n * n + 2 * n
    K = n * C
    # Program (j, c block): BK columns of stream j. The n programs of one c block are adjacent,
    # so with SITE their shared reads of du and dout (below) come from L2.
    j = tl.program_id(0) % n
    cc = (tl.program_id(0) // n) * BK + tl.arange(0, BK)
    k_mask = cc < C
    kk = j * C + cc
    split = tl.program_id(1)
    pp, pp_mask, res, res_mask = _row_groups(n, W2, P)
    # This block's columns of fn stay in registers for the whole token loop.
    f_pp = _tile(fn_ptr, pp, pp_mask, kk, k_mask, K)
    f_res = _tile(fn_ptr, res, res_mask, kk, k_mask, K)
    dfn_pp = tl.zeros((W2, BK), dtype=tl.float32)
    dfn_res = tl.zeros((P * P, BK), dtype=tl.float32)
    t_start = split * tokens_per_split
    t_end = tl.minimum(t_start + tokens_per_split, T)
    for t0 in range(t_start, t_end, BT):
        t = t0 + tl.arange(0, BT)
        t_mask = t < t_end
        t64 = t.to(tl.int64)
        xk_mask = t_mask[:, None] & k_mask[None, :]
        x = tl.load(x_ptr + t64[:, None] * K + kk[None, :], mask=xk_mask, other=0.0)
        x = x.to(tl.float32)
        dm_pp = _tile(dm_ptr, t64, t_mask, pp, pp_mask, N)
        dm_res = _tile(dm_ptr, t64, t_mask, res, res_mask, N)
        coef = tl.load(rms_coef_ptr + t, mask=t_mask, other=0.0)
        acc = coef[:, None] * x
        if SITE:
            # The site's other terms of dx[j]: h_pre[j] * du + sum_i h_res[i, j] * dout[i].
            h_j = tl.load(h_pre_ptr + t64 * n + j, mask=t_mask, other=0.0)
            du = tl.load(du_ptr + t64[:, None] * C + cc[None, :], mask=xk_mask, other=0.0)
            acc += h_j[:, None] * du.to(tl.float32)
            if HAS_DOUT:
                for i in tl.static_range(n):
                    h_ij = tl.load(h_res_ptr + t64 * (n * n) + i * n + j, mask=t_mask, other=0.0)
                    d_i = tl.load(
                        dout_ptr + t64[:, None] * K + i * C + cc[None, :], mask=xk_mask, other=0.0
                    )
                    acc += h_ij[:, None] * d_i.to(tl.float32)
        dx = _dot(dm_pp, f_pp, acc, MODE_DX)
        dx = _dot(dm_res, f_res, dx, MODE_DX)
        tl.store(
            dx_ptr + t64[:, None] * K + kk[None, :], dx.to(dx_ptr.dtype.element_ty), mask=xk_mask
        )
        dfn_pp = _dot(tl.trans(dm_pp), x, dfn_pp, MODE_DFN)
        dfn_res = _dot(tl.trans(dm_res), x, dfn_res, MODE_DFN)
    part = part_fn_ptr + split.to(tl.int64) * N * K
    tl.store(part + pp[:, None] * K + kk[None, :], dfn_pp, mask=pp_mask[:, None] & k_mask[None, :])
    tl.store(
        part + res[:, None] * K + kk[None, :], dfn_res, mask=res_mask[:, None] & k_mask[None, :]
    )


def _layout(n: int) -> tuple[int, int]:
    """``(W2, P)``: register widths of ``[pre | post]`` and of the res matrix side.

    ``tl.dot`` needs every dimension >= 16, hence ``W2 >= 16`` and ``P*P >= 16``.
    """
    return max(16, triton.next_power_of_2(2 * n)), max(4, triton.next_power_of_2(n))


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: still splits the tokens, so tests cover the split path


def _token_splits(t: int, bt: int, column_blocks: int, device: torch.device) -> tuple[int, int]:
    """``(splits, tokens per split)`` of a pass whose programs own a column block.

    Each program owns its column block for a range of tokens: enough programs to fill the GPU
    twice over, each range a multiple of ``bt``.
    """
    splits = max(1, min(triton.cdiv(t, bt), triton.cdiv(2 * _num_sms(device), column_blocks)))
    per_split = max(1, triton.cdiv(triton.cdiv(t, splits), bt)) * bt
    return max(1, triton.cdiv(t, per_split)), per_split


def _check(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, iters: int):
    if x.dim() < 2:
        raise ValueError(f"x must be [..., n, C], got shape {tuple(x.shape)}")
    n, c = x.shape[-2], x.shape[-1]
    check_num_streams(n)
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(
            f"the fused mHC kernels take bf16, fp16 or fp32 x, got {x.dtype}; cast x or use "
            "--mhc-backend torch"
        )
    rows = n * n + 2 * n
    if tuple(fn.shape) != (rows, n * c):
        raise ValueError(
            f"fn must be [n*n + 2n, n*C] = [{rows}, {n * c}] for x [..., n={n}, C={c}], got "
            f"{tuple(fn.shape)}"
        )
    if tuple(base.shape) != (rows,) or tuple(scale.shape) != (3,):
        raise ValueError(
            f"base must be [{rows}] and scale [3], got {tuple(base.shape)} and {tuple(scale.shape)}"
        )
    if any(p.dtype != torch.float32 for p in (fn, base, scale)):
        raise ValueError("fn, base and scale must be fp32 (mHC parameters stay fp32 under bf16)")
    if len({p.device for p in (x, fn, base, scale)}) != 1:
        raise ValueError("x, fn, base and scale must be on the same device")
    if iters < 1:
        raise ValueError(f"sinkhorn needs iters >= 1, got {iters}")


def _forward(x2, fn, base, scale, n, iters, eps, pre=False):
    """Launches ``_fwd_kernel`` on ``x2: [T, n*C]``.

    Returns ``(h_pre [T, n], h_post [T, n], h_res [T, n, n], mixes [T, N], inv_rms [T])``, all
    fp32, then with ``pre`` the pre-mix ``u [T, C]`` in x's dtype.
    """
    t, k = x2.shape
    u = torch.empty(t, k // n, dtype=x2.dtype, device=x2.device) if pre else None
    w2, p = _layout(n)
    f32 = dict(device=x2.device, dtype=torch.float32)
    h_pre, h_post = torch.empty(t, n, **f32), torch.empty(t, n, **f32)
    h_res, mixes = torch.empty(t, n, n, **f32), torch.empty(t, n * n + 2 * n, **f32)
    inv_rms = torch.empty(t, **f32)
    if t == 0:
        return (h_pre, h_post, h_res, mixes, inv_rms) + ((u,) if pre else ())
    # 64 tokens a program: on sm_90 one warpgroup's wgmma tile (M = 64; 32 would run mma.sync
    # with warps repeating work), and half the L2 reads of fn per byte of x. At few tokens the
    # bytes in flight per SM are the same as with twice the programs of 32 tokens.
    bt = 64
    mode = "tf32x3" if x2.dtype == torch.float32 else "split_b"
    _fwd_kernel[(triton.cdiv(t, bt),)](
        x2, fn, base, scale, h_pre, h_post, h_res, mixes, inv_rms, x2 if u is None else u, t, k,
        iters, eps, n=n, W2=w2, P=p, BT=bt, BK=64, MODE=mode, PRE=pre,
        num_warps=4, num_stages=3,  # one warpgroup: 8 warps would repeat the 64-row MMAs
    )  # fmt: skip
    return (h_pre, h_post, h_res, mixes, inv_rms) + ((u,) if pre else ())


def _backward(x2, fn, base, scale, mixes, inv_rms, g_pre, g_post, g_res, n, iters, eps,
              site=None):  # fmt: skip
    """Returns ``(d_x [T, n*C] in x's dtype, d_fn [N, n*C], d_base [N], d_scale [3])``.

    With ``site = (du [T, C], h_pre [T, n], h_res [T, n, n], dout [T, n*C] or None)`` (the
    fused site, :mod:`mhc_megatron.kernels.site`), ``d_x`` also holds the pre-mix's
    ``h_pre[j] * du`` and the residual mix's ``sum_i h_res[i, j] * dout[i]``: one pass writes
    the site's whole ``d_x``.
    """
    dm, rms_coef, dbase, dscale = _backward_coef(
        mixes, inv_rms, base, scale, g_pre, g_post, g_res, x2.shape[1], n, iters, eps
    )
    dx, dfn = _backward_x(x2, fn, dm, rms_coef, n, site)
    return dx, dfn, dbase, dscale


def _backward_coef(mixes, inv_rms, base, scale, g_pre, g_post, g_res, k, n, iters, eps):
    """The coefficients' backward, per token.

    Returns ``(d_mixes * inv_rms [T, N], rms_coef [T], d_base [N], d_scale [3])``;
    ``d_x = rms_coef * x + (d_mixes * inv_rms) @ fn`` and ``d_fn = (d_mixes * inv_rms).T @ x``
    follow in a pass over ``x`` (:func:`_backward_x`).
    """
    t = mixes.shape[0]
    rows = n * n + 2 * n
    w2, p = _layout(n)
    f32 = dict(device=mixes.device, dtype=torch.float32)
    bt = 32 if p <= 4 else 16
    blocks = triton.cdiv(t, bt)
    dm, rms_coef = torch.empty(t, rows, **f32), torch.empty(t, **f32)
    if t == 0:
        return dm, rms_coef, torch.zeros(rows, **f32), torch.zeros(3, **f32)
    part = torch.empty(blocks, rows + 3, **f32)  # [d_base | d_scale] per block
    scratch = torch.empty(blocks * 2 * iters * bt * p, **f32)
    _bwd_coef_kernel[(blocks,)](
        mixes, inv_rms, base, scale, g_pre, g_post, g_res, dm, rms_coef, part, scratch, t, k,
        iters, eps, n=n, W2=w2, P=p, BT=bt, num_warps=4,
    )  # fmt: skip
    # torch.sum over a fixed shape is a fixed-order reduction: deterministic.
    dbase, dscale = part.sum(0).split([rows, 3])
    return dm, rms_coef, dbase, dscale


def _backward_x(x2, fn, dm, rms_coef, n, site=None):
    """``(d_x [T, n*C], d_fn [N, n*C])`` from :func:`_backward_coef`'s outputs.

    ``site`` is as in :func:`_backward`.
    """
    t, k = x2.shape
    c = k // n
    rows = n * n + 2 * n
    w2, p = _layout(n)
    f32 = dict(device=x2.device, dtype=torch.float32)
    bk = 64 if p <= 4 else 32
    bt = 32
    k_blocks = n * triton.cdiv(c, bk)
    splits, per_split = _token_splits(t, bt, k_blocks, x2.device)
    dx = torch.empty_like(x2)
    part_fn = torch.empty(splits, rows, k, **f32)
    exact = x2.dtype != torch.float32
    du, h_pre, h_res, dout = site if site is not None else (x2, x2, x2, None)  # unused without
    _bwd_x_kernel[(k_blocks, splits)](
        x2, fn, dm, rms_coef, dx, part_fn, du, h_pre, h_res, x2 if dout is None else dout, t, c,
        per_split, n=n, W2=w2, P=p, BT=bt, BK=bk, MODE_DX="tf32x3",
        MODE_DFN="split_a" if exact else "tf32x3", SITE=site is not None,
        HAS_DOUT=dout is not None, num_warps=4, num_stages=3,  # 8 repeat MMA work at n = 8
    )  # fmt: skip
    # One split (few tokens or many column blocks) is already the sum: no reduction launch.
    return dx, part_fn[0] if splits == 1 else part_fn.sum(0)


class MHCCoefficientsFunction(torch.autograd.Function):
    """Autograd of the fused coefficients; see :func:`mhc_coefficients`."""

    @staticmethod
    def forward(ctx, x, fn, base, scale, iters, eps):
        """Runs the fused forward on ``x: [..., n, C]``; returns ``(h_pre, h_post, h_res)``.

        Saves ``x`` flattened to ``[T, n*C]``, the parameters, ``mixes`` and ``inv_rms`` for
        the backward.
        """
        n, c = x.shape[-2], x.shape[-1]
        x2 = x.reshape(-1, n * c).contiguous()
        h_pre, h_post, h_res, mixes, inv_rms = _forward(x2, fn, base, scale, n, iters, eps)
        ctx.save_for_backward(x2, fn, base, scale, mixes, inv_rms)
        ctx.shape, ctx.n, ctx.iters, ctx.eps = x.shape, n, iters, eps
        lead = x.shape[:-2]
        return h_pre.view(*lead, n), h_post.view(*lead, n), h_res.view(*lead, n, n)

    @staticmethod
    def backward(ctx, g_pre, g_post, g_res):
        """Gradients of ``(x, fn, base, scale)`` from those of ``(h_pre, h_post, h_res)``."""
        x2, fn, base, scale, mixes, inv_rms = ctx.saved_tensors
        n = ctx.n
        # Gradients of sums arrive expanded (stride 0): the kernels index them as dense [T, ...].
        g_pre, g_post, g_res = (
            g.reshape(-1, *g.shape[len(ctx.shape) - 2 :]).contiguous()
            for g in (g_pre, g_post, g_res)
        )
        dx, dfn, dbase, dscale = _backward(
            x2, fn, base, scale, mixes, inv_rms, g_pre, g_post, g_res, n, ctx.iters, ctx.eps
        )
        return dx.view(ctx.shape), dfn, dbase, dscale, None, None


def mhc_coefficients(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    iters: int = 20,
    eps: float = 1e-6,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused mHC coefficients of one site.

    Same math and signature as :func:`mhc_megatron.ops.mhc_coefficients`, plus
    ``deterministic``.

    Args:
        x: ``[..., n, C]`` streams, bf16, fp16 or fp32 (math in fp32), ``n <= 8``; leading dims
            are flattened to ``T`` tokens, ``x: [T, n*C]``.
        fn: ``[n*n + 2n, n*C]`` fp32 projection, rows ``[pre | post | res]``.
        base: ``[n*n + 2n]`` fp32 static logits, same order.
        scale: ``[3]`` fp32 gating factors ``(alpha_pre, alpha_post, alpha_res)``.
        iters: Sinkhorn iterations, ``>= 1``.
        eps: eps of the RMS, of ``h_pre`` and of the Sinkhorn denominators.
        deterministic: accepted for the ``--deterministic-mode`` switch; the kernels use no
            atomics, so every gradient is bitwise reproducible run to run in either mode.

    Returns:
        ``(h_pre [..., n], h_post [..., n], h_res [..., n, n])``, fp32. Gradients: ``x``'s in
        ``x``'s dtype, the parameters' in fp32.

    Raises:
        ValueError: ``n > 8``, shapes that do not match, or unsupported dtypes; the message says
            what to change.
    """
    del deterministic  # no atomics anywhere: both modes are deterministic
    _check(x, fn, base, scale, iters)
    return MHCCoefficientsFunction.apply(
        x, fn.contiguous(), base.contiguous(), scale.contiguous(), int(iters), float(eps)
    )
