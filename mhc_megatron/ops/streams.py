"""Entering and leaving the n-stream residual (spec section 2).

Expand after the embedding, collapse before the final norm.
"""

import torch


def expand_streams(x: torch.Tensor, n: int) -> torch.Tensor:
    """Copies the embedding output into n identical streams.

    Args:
        x: ``[..., C]``.
        n: number of streams, ``>= 1``.

    Returns:
        ``[..., n, C]`` (a new tensor, not a broadcast view).
    """
    if n < 1:
        raise ValueError(f"expand_streams needs n >= 1, got {n}")
    return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1]).contiguous()


def collapse_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of the streams (what Megatron-LM main does).

    Args:
        x: ``[..., n, C]``.

    Returns:
        ``[..., C]`` in x's dtype (averaged in fp32).
    """
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    return x.to(compute_dtype).mean(dim=-2).to(x.dtype)


def collapse_head(
    x: torch.Tensor,
    fn_h: torch.Tensor,
    base_h: torch.Tensor,
    scale_h: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """DeepSeek-V4's learned collapse: ``out = sum_i w[i] * x[i]``.

    ``w = sigmoid(scale_h * (x @ fn_h.T) * rsqrt(mean(x*x) + eps) + base_h) + eps``, with the RMS
    over all n*C values of a token.

    Args:
        x: ``[..., n, C]`` streams.
        fn_h: ``[n, n*C]``.
        base_h: ``[n]``.
        scale_h: ``[1]``.
        eps: eps of the RMS and of the weights.

    Returns:
        ``[..., C]`` in x's dtype (computed in fp32).
    """
    n, width = x.shape[-2], x.shape[-2] * x.shape[-1]
    if tuple(fn_h.shape) != (n, width):
        raise ValueError(f"fn_h must be [n, n*C] = [{n}, {width}], got {tuple(fn_h.shape)}")
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    flat = x.flatten(-2).to(compute_dtype)
    inv_rms = torch.rsqrt(flat.pow(2).mean(dim=-1, keepdim=True) + eps)
    logits = scale_h.to(compute_dtype) * (flat @ fn_h.to(compute_dtype).t()) * inv_rms
    w = torch.sigmoid(logits + base_h.to(compute_dtype)) + eps
    out = (w.unsqueeze(-1) * x.to(compute_dtype)).sum(dim=-2)
    return out.to(x.dtype)
