"""Fused pre-mix ``u = sum_j h_pre[j] * x[j]`` (spec eq. 3), forward and backward.

Matches :func:`mhc_megatron.ops.mhc_pre`. Both passes are purely memory-bound: the forward reads
the n streams once and writes ``u`` once; the backward reads ``du`` and ``x`` once, writes ``dx``
once and reduces ``dh_pre`` over C in the same pass. Loads are cast to fp32 straight away, all
arithmetic is fp32, and stores cast to the output's dtype.

Shapes (leading dims are flattened to T tokens): ``x: [T, n, C]``, ``h_pre: [T, n]``,
``u: [T, C]``.
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
_BWD_TILE = 2048  # the backward holds du, x and dx chunks at once


@triton.jit
def _pre_fwd_kernel(
    x_ptr,  # [T, N, C]
    h_ptr,  # [T, N]
    u_ptr,  # [T, C]
    C,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Grid (T, cdiv(C, BLOCK_C)): no reduction over C, so C is split across programs too, which
    # keeps the GPU busy when T is small.
    tok = tl.program_id(0).to(tl.int64)  # int64: T * n * C can pass 2^31
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_n = tl.arange(0, N_PAD)
    mask_c = offs_c < C
    mask_n = offs_n < N  # n is padded to a power of two; padded rows read as 0

    h = tl.load(h_ptr + tok * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    x_ptrs = x_ptr + tok * N * C + offs_n[:, None] * C + offs_c[None, :]
    x = tl.load(x_ptrs, mask=mask_n[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
    u = tl.sum(h[:, None] * x, axis=0)
    tl.store(u_ptr + tok * C + offs_c, u.to(u_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def _pre_bwd_kernel(
    x_ptr,  # [T, N, C]
    h_ptr,  # [T, N]
    du_ptr,  # [T, C]
    dx_ptr,  # [T, N, C]
    dh_ptr,  # [T, N] fp32
    C,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    WRITE_DX: tl.constexpr,
):
    # Without WRITE_DX only dh_pre: the fused site adds h_pre * du to its single dx pass.
    # One program per token: dh_pre reduces over all of C, so the program walks C in chunks and
    # keeps the partial sums in fp32 registers (no atomics, deterministic).
    tok = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, N_PAD)
    mask_n = offs_n < N

    h = tl.load(h_ptr + tok * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    dh = tl.zeros([N_PAD], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        mask = mask_n[:, None] & mask_c[None, :]
        du = tl.load(du_ptr + tok * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        tile = tok * N * C + offs_n[:, None] * C + offs_c[None, :]
        x = tl.load(x_ptr + tile, mask=mask, other=0.0).to(tl.float32)
        if WRITE_DX:
            dx = h[:, None] * du[None, :]  # dx[j] = h_pre[j] * du
            tl.store(dx_ptr + tile, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dh += tl.sum(x * du[None, :], axis=1)  # dh_pre[j] = sum_c du[c] * x[j, c]
    tl.store(dh_ptr + tok * N + offs_n, dh, mask=mask_n)


def _check_inputs(x: torch.Tensor, h_pre: torch.Tensor) -> None:
    """Raise ValueError, saying what to change, for inputs the kernels do not handle."""
    if x.dim() < 2:
        raise ValueError(f"mhc_pre: x must be [..., n, C], got shape {tuple(x.shape)}")
    n = x.shape[-2]
    check_num_streams(n)
    if h_pre.shape != x.shape[:-1]:
        raise ValueError(
            f"mhc_pre: h_pre must be x.shape[:-1] = {tuple(x.shape[:-1])} (no broadcasting), "
            f"got {tuple(h_pre.shape)}"
        )
    for name, t in (("x", x), ("h_pre", h_pre)):
        if t.dtype not in _STREAM_DTYPES:
            raise ValueError(
                f"mhc_pre: {name}.dtype={t.dtype} is not supported by the fused kernels "
                "(float32, bfloat16, float16); use --mhc-backend torch"
            )
    if h_pre.device != x.device:
        raise ValueError(f"mhc_pre: x is on {x.device} but h_pre is on {h_pre.device}")


def pre_forward(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """Launch the forward.

    Args:
        x: ``[T, n, C]`` contiguous streams.
        h_pre: ``[T, n]`` contiguous weights.

    Returns:
        u: ``[T, C]`` in x's dtype.
    """
    T, n, C = x.shape
    u = torch.empty((T, C), dtype=x.dtype, device=x.device)
    if T == 0 or C == 0:
        return u
    n_pad, block_c, num_warps = stream_tile(n, C, _FWD_TILE)
    grid = (T, triton.cdiv(C, block_c))
    _pre_fwd_kernel[grid](x, h_pre, u, C, N=n, N_PAD=n_pad, BLOCK_C=block_c, num_warps=num_warps)
    return u


def pre_backward(
    x: torch.Tensor, h_pre: torch.Tensor, du: torch.Tensor, write_dx: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Launch the backward.

    Args:
        x: ``[T, n, C]`` contiguous streams saved from the forward.
        h_pre: ``[T, n]`` contiguous weights.
        du: ``[T, C]`` contiguous gradient of ``u``.
        write_dx: compute ``dx``; the fused site passes False (only ``dh_pre``).

    Returns:
        ``(dx [T, n, C] in x's dtype or None, dh_pre [T, n] in fp32)``.
    """
    T, n, C = x.shape
    dx = torch.empty_like(x) if write_dx else None
    dh = torch.empty((T, n), dtype=torch.float32, device=x.device)  # written in full
    if T == 0 or C == 0:
        return dx, dh.zero_()
    n_pad, block_c, num_warps = stream_tile(n, C, _BWD_TILE)
    _pre_bwd_kernel[(T,)](
        x, h_pre, du, dx if write_dx else x, dh, C, N=n, N_PAD=n_pad, BLOCK_C=block_c,
        WRITE_DX=write_dx, num_warps=num_warps,
    )  # fmt: skip
    return dx, dh


class MHCPreFunction(torch.autograd.Function):
    """Autograd wrapper; saves ``x`` and ``h_pre`` (flattened to ``[T, n, C]``, ``[T, n]``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
        """Checks the inputs, flattens them to ``T`` tokens and runs the fused forward.

        Returns ``u: [..., C]`` in x's dtype.
        """
        _check_inputs(x, h_pre)
        lead, (n, C) = x.shape[:-2], x.shape[-2:]
        T = math.prod(lead)  # explicit, so that empty tensors reshape too
        x2 = x.contiguous().view(T, n, C)
        h2 = h_pre.contiguous().view(T, n)
        u = pre_forward(x2, h2)
        ctx.save_for_backward(x2, h2)
        ctx.h_dtype = h_pre.dtype
        return u.view(*lead, C)

    @staticmethod
    def backward(ctx, du: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of ``(x, h_pre)`` from ``du: [..., C]``, in the inputs' dtypes."""
        x2, h2 = ctx.saved_tensors
        T, n, C = x2.shape
        lead = du.shape[:-1]
        dx, dh = pre_backward(x2, h2, du.contiguous().view(T, C))
        # dh_pre is reduced in fp32; autograd wants the gradient in the input's dtype.
        return dx.view(*lead, n, C), dh.to(ctx.h_dtype).view(*lead, n)


def mhc_pre(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """Branch input ``u = sum_j h_pre[j] * x[j]`` (spec eq. 3), fused; same as ``ops.mhc_pre``.

    Args:
        x: ``[..., n, C]`` streams, float32 / bfloat16 / float16, ``n <= 8``.
        h_pre: ``[..., n]`` weights (fp32 in mHC), same leading dims as x.

    Returns:
        ``[..., C]`` in x's dtype (accumulated in fp32).

    Raises:
        ValueError: unsupported n or dtype, mismatched shapes or devices.
    """
    return MHCPreFunction.apply(x, h_pre)
