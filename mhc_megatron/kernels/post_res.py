"""Fused post + residual mix ``x_next[i] = sum_j h_res[i, j] x[j] + h_post[i] y`` (spec eq. 3).

Matches :func:`mhc_megatron.ops.mhc_post_res`. Both passes are purely memory-bound, and each
tensor is touched once: the forward reads ``x`` and ``y`` and writes ``x_next`` (per token
``(n + 1) C`` reads, ``n C`` writes, as in the paper); the backward reads ``dout``, ``x`` and
``y``, writes ``dx`` and ``dy``, and reduces ``dh_post`` and ``dh_res`` over C in the same pass.
Loads are cast to fp32 straight away, all arithmetic is fp32, stores cast to the output dtype.

Shapes (leading dims are flattened to T tokens): ``x: [T, n, C]``, ``y: [T, C]``,
``h_post: [T, n]``, ``h_res: [T, n, n]``, ``x_next: [T, n, C]``.

The forward has no reduction over C and runs on a (token, C-block) grid, so a later fusion can
add the next site's pre-mix (``sum_i h_pre[i] x_next[i]``) to the same program.
"""

import math

import torch
import triton
import triton.language as tl

from mhc_megatron.kernels._common import check_num_streams, stream_tile

_STREAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Largest [N_PAD, BLOCK_C] tile a program holds: 4096 fp32 values is 32 registers per thread at
# 4 warps, enough bytes in flight per program for HBM bandwidth without spilling.
_FWD_TILE = 4096
_BWD_TILE = 2048  # the backward holds dout, a row of x and the dx/dy rows at once


@triton.jit
def _post_res_fwd_kernel(
    x_ptr,  # [T, N, C]
    y_ptr,  # [T, C]
    hpost_ptr,  # [T, N]
    hres_ptr,  # [T, N, N]
    out_ptr,  # [T, N, C]
    C,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Grid (T, cdiv(C, BLOCK_C)). The output tile is [N_PAD, BLOCK_C] (rows i); the input streams
    # are read one row j at a time and added as a rank-1 update, so no [n, n, BLOCK_C] product
    # is ever materialised and each x row is loaded exactly once.
    tok = tl.program_id(0).to(tl.int64)  # int64: T * n * C can pass 2^31
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_i = tl.arange(0, N_PAD)
    mask_c = offs_c < C
    mask_i = offs_i < N  # n is padded to a power of two; padded rows are masked off

    y = tl.load(y_ptr + tok * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    h_post = tl.load(hpost_ptr + tok * N + offs_i, mask=mask_i, other=0.0).to(tl.float32)
    acc = h_post[:, None] * y[None, :]
    x_tok = x_ptr + tok * N * C
    for j in tl.static_range(N):
        x_j = tl.load(x_tok + j * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        h_col = tl.load(hres_ptr + tok * N * N + offs_i * N + j, mask=mask_i, other=0.0)
        acc += h_col.to(tl.float32)[:, None] * x_j[None, :]  # x_next[i] += h_res[i, j] x[j]
    out_ptrs = out_ptr + tok * N * C + offs_i[:, None] * C + offs_c[None, :]
    mask = mask_i[:, None] & mask_c[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _post_res_bwd_kernel(
    x_ptr,  # [T, N, C]
    y_ptr,  # [T, C]
    hpost_ptr,  # [T, N]
    hres_ptr,  # [T, N, N]
    dout_ptr,  # [T, N, C]
    dx_ptr,  # [T, N, C]
    dy_ptr,  # [T, C]
    dhpost_ptr,  # [T, N] fp32
    dhres_ptr,  # [T, N, N] fp32
    C,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    WRITE_DX: tl.constexpr,
):
    # One program per token: dh_post and dh_res reduce over all of C, so the program walks C in
    # chunks and keeps the partial sums in fp32 registers (no atomics, deterministic). Without
    # WRITE_DX the fused site writes dx later, in one pass with the other terms of dx.
    tok = tl.program_id(0).to(tl.int64)
    offs_i = tl.arange(0, N_PAD)  # rows of dout / h_res (output stream i)
    offs_j = tl.arange(0, N_PAD)  # columns of h_res (input stream j)
    mask_i = offs_i < N
    mask_ij = mask_i[:, None] & (offs_j < N)[None, :]

    h_post = tl.load(hpost_ptr + tok * N + offs_i, mask=mask_i, other=0.0).to(tl.float32)
    hres_ptrs = hres_ptr + tok * N * N + offs_i[:, None] * N + offs_j[None, :]
    h_res = tl.load(hres_ptrs, mask=mask_ij, other=0.0).to(tl.float32)  # [i, j], read once
    dh_post = tl.zeros([N_PAD], dtype=tl.float32)
    dh_res = tl.zeros([N_PAD, N_PAD], dtype=tl.float32)
    x_tok = x_ptr + tok * N * C
    dx_tok = dx_ptr + tok * N * C
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        dout_ptrs = dout_ptr + tok * N * C + offs_i[:, None] * C + offs_c[None, :]
        dout = tl.load(dout_ptrs, mask=mask_i[:, None] & mask_c[None, :], other=0.0)
        dout = dout.to(tl.float32)  # [i, c]
        y = tl.load(y_ptr + tok * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)

        dy = tl.sum(h_post[:, None] * dout, axis=0)  # dy = sum_i h_post[i] dout[i]
        tl.store(dy_ptr + tok * C + offs_c, dy.to(dy_ptr.dtype.element_ty), mask=mask_c)
        dh_post += tl.sum(dout * y[None, :], axis=1)  # dh_post[i] = sum_c dout[i, c] y[c]

        for j in tl.static_range(N):
            # Column j of h_res, picked out of registers (a masked row-sum, n*n flops).
            if WRITE_DX:
                h_col = tl.sum(tl.where(offs_j[None, :] == j, h_res, 0.0), axis=1)  # [i]
                dx_j = tl.sum(h_col[:, None] * dout, axis=0)  # dx[j] = sum_i h_res[i, j] dout[i]
                tl.store(dx_tok + j * C + offs_c, dx_j.to(dx_ptr.dtype.element_ty), mask=mask_c)
            x_j = tl.load(x_tok + j * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            part = tl.sum(dout * x_j[None, :], axis=1)  # sum_c dout[i, c] x[j, c], over i
            dh_res += tl.where(offs_j[None, :] == j, part[:, None], 0.0)  # into column j
    tl.store(dhpost_ptr + tok * N + offs_i, dh_post, mask=mask_i)
    dhres_ptrs = dhres_ptr + tok * N * N + offs_i[:, None] * N + offs_j[None, :]
    tl.store(dhres_ptrs, dh_res, mask=mask_ij)


def _check_inputs(
    x: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor
) -> None:
    """Raise ValueError, saying what to change, for inputs the kernels do not handle."""
    if x.dim() < 2:
        raise ValueError(f"mhc_post_res: x must be [..., n, C], got shape {tuple(x.shape)}")
    n = x.shape[-2]
    check_num_streams(n)
    lead, C = x.shape[:-2], x.shape[-1]
    expected = {"y": (*lead, C), "h_post": (*lead, n), "h_res": (*lead, n, n)}
    for name, t in (("y", y), ("h_post", h_post), ("h_res", h_res)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(
                f"mhc_post_res: {name} must have shape {expected[name]} for x of shape "
                f"{tuple(x.shape)} (no broadcasting), got {tuple(t.shape)}"
            )
    for name, t in (("x", x), ("y", y), ("h_post", h_post), ("h_res", h_res)):
        if t.dtype not in _STREAM_DTYPES:
            raise ValueError(
                f"mhc_post_res: {name}.dtype={t.dtype} is not supported by the fused kernels "
                "(float32, bfloat16, float16); use --mhc-backend torch"
            )
        if t.device != x.device:
            raise ValueError(f"mhc_post_res: x is on {x.device} but {name} is on {t.device}")


def post_res_forward(
    x: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor
) -> torch.Tensor:
    """Launch the forward.

    Args:
        x: ``[T, n, C]`` contiguous streams.
        y: ``[T, C]`` contiguous branch output.
        h_post: ``[T, n]`` contiguous.
        h_res: ``[T, n, n]`` contiguous.

    Returns:
        x_next: ``[T, n, C]`` in x's dtype.
    """
    T, n, C = x.shape
    out = torch.empty_like(x)
    if T == 0 or C == 0:
        return out
    n_pad, block_c, num_warps = stream_tile(n, C, _FWD_TILE)
    grid = (T, triton.cdiv(C, block_c))
    _post_res_fwd_kernel[grid](
        x, y, h_post, h_res, out, C, N=n, N_PAD=n_pad, BLOCK_C=block_c, num_warps=num_warps
    )
    return out


def post_res_backward(
    x: torch.Tensor,
    y: torch.Tensor,
    h_post: torch.Tensor,
    h_res: torch.Tensor,
    dout: torch.Tensor,
    write_dx: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward.

    Args:
        x: ``[T, n, C]`` contiguous streams, the forward's input.
        y: ``[T, C]`` contiguous branch output, the forward's input.
        h_post: ``[T, n]`` contiguous, the forward's input.
        h_res: ``[T, n, n]`` contiguous, the forward's input.
        dout: ``[T, n, C]`` contiguous gradient of ``x_next``.
        write_dx: compute ``dx``; the fused site passes False and adds ``h_res.T @ dout`` to its
            single ``dx`` pass (:mod:`mhc_megatron.kernels.site`).

    Returns:
        ``(dx [T, n, C] in x's dtype or None, dy [T, C] in y's dtype, dh_post [T, n] fp32,
        dh_res [T, n, n] fp32)``.
    """
    T, n, C = x.shape
    dx = torch.empty_like(x) if write_dx else None
    dy = torch.empty_like(y)
    # Written in full by the kernel (every token, every i, j < n): no memset.
    dh_post = torch.empty((T, n), dtype=torch.float32, device=x.device)
    dh_res = torch.empty((T, n, n), dtype=torch.float32, device=x.device)
    if T == 0 or C == 0:
        return dx, dy, dh_post.zero_(), dh_res.zero_()
    n_pad, block_c, num_warps = stream_tile(n, C, _BWD_TILE)
    _post_res_bwd_kernel[(T,)](
        x,
        y,
        h_post,
        h_res,
        dout,
        dx if write_dx else dout,  # unused without WRITE_DX
        dy,
        dh_post,
        dh_res,
        C,
        N=n,
        N_PAD=n_pad,
        BLOCK_C=block_c,
        WRITE_DX=write_dx,
        num_warps=num_warps,
    )
    return dx, dy, dh_post, dh_res


class MHCPostResFunction(torch.autograd.Function):
    """Autograd wrapper; saves ``x``, ``y``, ``h_post``, ``h_res`` flattened to T tokens."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor
    ) -> torch.Tensor:
        """Checks the inputs, flattens them to ``T`` tokens and runs the fused forward.

        Returns ``x_next: [..., n, C]`` in x's dtype.
        """
        _check_inputs(x, y, h_post, h_res)
        lead, (n, C) = x.shape[:-2], x.shape[-2:]
        T = math.prod(lead)  # explicit, so that empty tensors reshape too
        x2 = x.contiguous().view(T, n, C)
        y2 = y.contiguous().view(T, C)
        hp2 = h_post.contiguous().view(T, n)
        hr2 = h_res.contiguous().view(T, n, n)
        out = post_res_forward(x2, y2, hp2, hr2)
        ctx.save_for_backward(x2, y2, hp2, hr2)
        ctx.h_dtypes = (h_post.dtype, h_res.dtype)
        return out.view(x.shape)

    @staticmethod
    def backward(
        ctx, dout: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients of ``(x, y, h_post, h_res)``, each in its input's dtype and shape."""
        x2, y2, hp2, hr2 = ctx.saved_tensors
        T, n, C = x2.shape
        lead = dout.shape[:-2]
        dx, dy, dh_post, dh_res = post_res_backward(
            x2, y2, hp2, hr2, dout.contiguous().view(T, n, C)
        )
        # Coefficient grads are reduced in fp32; autograd wants them in the inputs' dtypes.
        post_dtype, res_dtype = ctx.h_dtypes
        return (
            dx.view(*lead, n, C),
            dy.view(*lead, C),
            dh_post.to(post_dtype).view(*lead, n),
            dh_res.to(res_dtype).view(*lead, n, n),
        )


def mhc_post_res(
    x: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor
) -> torch.Tensor:
    """New streams ``x_next[i] = sum_j h_res[i, j] x[j] + h_post[i] y`` (spec eq. 3), fused.

    Same as ``ops.mhc_post_res``.

    Args:
        x: ``[..., n, C]`` streams entering the site, float32 / bfloat16 / float16, ``n <= 8``.
        y: ``[..., C]`` branch output (normally x's dtype).
        h_post: ``[..., n]`` (fp32 in mHC), same leading dims as x.
        h_res: ``[..., n, n]`` (fp32 in mHC), same leading dims as x.

    Returns:
        ``[..., n, C]`` in x's dtype (computed in fp32).

    Raises:
        ValueError: unsupported n or dtype, mismatched shapes or devices.
    """
    return MHCPostResFunction.apply(x, y, h_post, h_res)
