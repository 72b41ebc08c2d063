"""Per-token mixing coefficients of one site: mHC (Sinkhorn) and HC (unconstrained).

Both variants share the parameter layout of ``docs/mhc-spec.md`` section 1:
``fn [n*n + 2n, n*C]`` with rows ordered ``[pre (n) | post (n) | res (n*n)]``, ``base`` in the
same order, and ``scale [3] = (alpha_pre, alpha_post, alpha_res)``.
"""

import math

import torch

from mhc_megatron.ops.sinkhorn import sinkhorn


def num_streams_from_fn(fn: torch.Tensor) -> int:
    """Returns n from ``fn [n*n + 2n, n*C]`` (``n*n + 2n = (n+1)^2 - 1``)."""
    rows = fn.shape[0]
    n = math.isqrt(rows + 1) - 1
    if n < 1 or n * n + 2 * n != rows:
        raise ValueError(f"fn must have n*n + 2n rows for some n >= 1, got {rows}")
    return n


def _projected_mixes(x: torch.Tensor, fn: torch.Tensor, eps: float) -> tuple[torch.Tensor, int]:
    """``(x @ fn.T) * rsqrt(mean(x*x) + eps)`` in fp32, RMS over all n*C values of a token.

    Args:
        x: ``[..., n, C]`` streams of each token.
        fn: ``[n*n + 2n, n*C]``.
        eps: added under the square root.

    Returns:
        ``(mixes [..., n*n + 2n] fp32, n)``.
    """
    n = num_streams_from_fn(fn)
    if x.shape[-2] != n or fn.shape[1] != n * x.shape[-1]:
        raise ValueError(
            f"x [..., n, C] = {tuple(x.shape)} does not match fn [n*n+2n, n*C] = {tuple(fn.shape)}"
        )
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    flat = x.flatten(-2).to(compute_dtype)
    inv_rms = torch.rsqrt(flat.pow(2).mean(dim=-1, keepdim=True) + eps)
    # RMS applied after the GEMM (same value by linearity, as in DeepSeek-V4): the fused kernel
    # computes the projection and the sum of squares in one pass over x.
    mixes = (flat @ fn.to(compute_dtype).t()) * inv_rms
    return mixes, n


def mhc_coefficients(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    iters: int = 20,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC coefficients of one site (spec section 1).

    ``h_pre = sigmoid(a_pre * m_pre + b_pre) + eps``, ``h_post = 2 * sigmoid(a_post * m_post +
    b_post)``, ``H_res = sinkhorn(reshape(a_res * m_res + b_res, n, n))`` with
    ``m = (x @ fn.T) * rsqrt(mean(x*x) + eps)``.

    Args:
        x: ``[..., n, C]`` streams (any float dtype; math in fp32).
        fn: ``[n*n + 2n, n*C]`` projection, rows ``[pre | post | res]``.
        base: ``[n*n + 2n]`` static logits, same order.
        scale: ``[3]`` gating factors ``(alpha_pre, alpha_post, alpha_res)``.
        iters: Sinkhorn iterations.
        eps: eps of the RMS, of ``h_pre`` and of the Sinkhorn denominators.

    Returns:
        ``(h_pre [..., n], h_post [..., n], h_res [..., n, n])``, fp32 (fp64 for fp64 input).
        ``h_res[..., i, j]`` is logit entry ``i*n + j``; stream i of the output takes
        ``sum_j h_res[i, j] * x[j]``.
    """
    mixes, n = _projected_mixes(x, fn, eps)
    base = base.to(mixes.dtype)
    scale = scale.to(mixes.dtype)
    h_pre = torch.sigmoid(scale[0] * mixes[..., :n] + base[:n]) + eps
    h_post = 2.0 * torch.sigmoid(scale[1] * mixes[..., n : 2 * n] + base[n : 2 * n])
    res_logits = scale[2] * mixes[..., 2 * n :] + base[2 * n :]
    h_res = sinkhorn(res_logits.unflatten(-1, (n, n)), iters=iters, eps=eps)
    return h_pre, h_post, h_res


def hc_coefficients(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hyper-Connections coefficients (arXiv 2409.19606, dynamic HC), unconstrained.

    ``h = alpha * tanh(m) + b`` for each of pre, post and res, with the same normalised
    projection ``m`` and the same parameter layout as :func:`mhc_coefficients`, so one layer
    serves both variants. Nothing bounds the products of ``H_res`` across layers: this is the
    unstable ancestor the mHC paper compares against.

    Args:
        x: ``[..., n, C]`` streams.
        fn: ``[n*n + 2n, n*C]``.
        base: ``[n*n + 2n]``.
        scale: ``[3]``.
        eps: eps of the RMS.

    Returns:
        ``(h_pre [..., n], h_post [..., n], h_res [..., n, n])``, fp32 (fp64 for fp64 input).
    """
    mixes, n = _projected_mixes(x, fn, eps)
    base = base.to(mixes.dtype)
    scale = scale.to(mixes.dtype)
    gated = torch.tanh(mixes)
    h_pre = scale[0] * gated[..., :n] + base[:n]
    h_post = scale[1] * gated[..., n : 2 * n] + base[n : 2 * n]
    h_res = (scale[2] * gated[..., 2 * n :] + base[2 * n :]).unflatten(-1, (n, n))
    return h_pre, h_post, h_res
