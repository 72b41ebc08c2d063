"""Applying the coefficients: pre-mix (branch input) and post + residual mix (new streams)."""

import torch


def mhc_pre(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """Branch input ``u = sum_j h_pre[j] * x[j]`` (spec eq. 3).

    Args:
        x: ``[..., n, C]`` streams.
        h_pre: ``[..., n]`` fp32 weights.

    Returns:
        ``[..., C]`` in x's dtype (accumulated in fp32).
    """
    compute_dtype = torch.promote_types(x.dtype, h_pre.dtype)
    u = (h_pre.to(compute_dtype).unsqueeze(-1) * x.to(compute_dtype)).sum(dim=-2)
    return u.to(x.dtype)


def mhc_post_res(
    x: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor
) -> torch.Tensor:
    """New streams ``x_next[i] = sum_j h_res[i, j] * x[j] + h_post[i] * y`` (spec eq. 3).

    Args:
        x: ``[..., n, C]`` streams entering the site.
        y: ``[..., C]`` branch output.
        h_post: ``[..., n]`` fp32.
        h_res: ``[..., n, n]`` fp32.

    Returns:
        ``[..., n, C]`` in x's dtype (computed in fp32).
    """
    compute_dtype = torch.promote_types(x.dtype, h_res.dtype)
    mixed = torch.matmul(h_res.to(compute_dtype), x.to(compute_dtype))
    out = mixed + h_post.to(compute_dtype).unsqueeze(-1) * y.to(compute_dtype).unsqueeze(-2)
    return out.to(x.dtype)
