"""Sinkhorn-Knopp projection onto (approximately) doubly stochastic matrices."""

import torch


def sinkhorn(logits: torch.Tensor, iters: int = 20, eps: float = 1e-6) -> torch.Tensor:
    """Maps logits to a doubly stochastic matrix (mHC paper eq. 9).

    ``M = exp(L - max(L))``, then ``iters`` times: normalise the columns, then the rows, each
    denominator ``+ eps``. Ending on the rows makes the row sums exact (up to ``eps``); the column
    sums converge with more iterations. The max is taken over the whole matrix, a scalar shift
    that the normalisations cancel, so it changes nothing but the overflow behaviour.

    Args:
        logits: ``[..., n, n]``, any float dtype; computed in at least fp32.
        iters: number of (column, row) normalisation rounds; ``>= 1``.
        eps: added to every denominator; keeps an all-zero row or column finite.

    Returns:
        ``[..., n, n]`` with non-negative entries, rows summing to 1, in fp32 (fp64 for fp64
        input).
    """
    if iters < 1:
        raise ValueError(f"sinkhorn needs iters >= 1, got {iters}")
    if logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"sinkhorn needs square matrices [..., n, n], got {tuple(logits.shape)}")
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.to(compute_dtype)
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
    return m
