"""Sinkhorn-Knopp projection onto (approximately) doubly stochastic matrices."""

import torch


class _Sinkhorn(torch.autograd.Function):
    """The iterations of :func:`sinkhorn` with a backward that cannot overflow.

    Autograd of ``m / (sum(m) + eps)`` carries the gradient with respect to the values ``m`` and
    divides it by a denominator at every step. When logits differ by more than ~90 (fp32), whole
    rows or columns of ``exp(L - max)`` underflow to 0, their denominators are ``eps``, and each
    of the 2 * iters steps multiplies that gradient by up to ``1 / eps``: it overflows to inf and
    then to NaN (``inf * 0``), as ``--init-method-std 1e4`` showed. This backward carries
    ``q = g * m``, the gradient with respect to ``log m``, instead: for ``out = m / (sum(m) +
    eps)``, ``q_m = q_out - out * sum(q_out)``, with entries of ``out`` in [0, 1]. Same
    gradient wherever the forward has not underflowed; zero where it has.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
        peak = logits.amax(dim=(-2, -1), keepdim=True)
        m = torch.exp(logits - peak)
        steps = []  # the output of every normalisation, columns first
        for _ in range(iters):
            m = m / (m.sum(dim=-2, keepdim=True) + eps)
            steps.append(m)
            m = m / (m.sum(dim=-1, keepdim=True) + eps)
            steps.append(m)
        ctx.save_for_backward(logits, peak, *steps)
        return m

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, peak, *steps = ctx.saved_tensors
        q = grad * steps[-1]
        for k in reversed(range(len(steps))):
            summed = -2 if k % 2 == 0 else -1  # even steps normalise columns (sum over rows)
            q = q - steps[k] * q.sum(dim=summed, keepdim=True)
        # q is the gradient with respect to L - max; the max takes minus the whole sum, split
        # evenly between ties (as torch.amax's backward does).
        is_peak = (logits == peak).to(q.dtype)
        shift = q.sum(dim=(-2, -1), keepdim=True) / is_peak.sum(dim=(-2, -1), keepdim=True)
        return q - is_peak * shift, None, None


def sinkhorn(logits: torch.Tensor, iters: int = 20, eps: float = 1e-6) -> torch.Tensor:
    """Maps logits to a doubly stochastic matrix (mHC paper eq. 9).

    ``M = exp(L - max(L))``, then ``iters`` times: normalise the columns, then the rows, each
    denominator ``+ eps``. Ending on the rows makes the row sums exact (up to ``eps``); the column
    sums converge with more iterations. The max is taken over the whole matrix, a scalar shift
    that the normalisations cancel, so it changes nothing but the overflow behaviour. The
    backward is computed in a form that stays finite when entries underflow (:class:`_Sinkhorn`).

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
    return _Sinkhorn.apply(logits.to(compute_dtype), int(iters), float(eps))
