"""Per-token mixing coefficients of one site.

Three variants: mHC (Sinkhorn), HC (unconstrained) and mHC-lite (convex combinations of
permutation matrices).

mHC and HC share the parameter layout of ``docs/mhc-spec.md`` section 1:
``fn [n*n + 2n, n*C]`` with rows ordered ``[pre (n) | post (n) | res (n*n)]``, ``base`` in the
same order, and ``scale [3] = (alpha_pre, alpha_post, alpha_res)``. mHC-lite has ``n!`` res rows
(one logit per permutation) instead of ``n*n``: ``fn [n! + 2n, n*C]``.
"""

import functools
import itertools
import math

import torch

from mhc_megatron.ops.sinkhorn import sinkhorn

# mHC-lite's res rows grow as n!: 720 at n = 6 is already 30 times mHC's 24 (n = 4); beyond, the
# projection would dwarf the site.
MAX_LITE_STREAMS = 6


def num_streams_from_fn(fn: torch.Tensor) -> int:
    """Returns n from ``fn [n*n + 2n, n*C]`` (``n*n + 2n = (n+1)^2 - 1``)."""
    rows = fn.shape[0]
    n = math.isqrt(rows + 1) - 1
    if n < 1 or n * n + 2 * n != rows:
        raise ValueError(f"fn must have n*n + 2n rows for some n >= 1, got {rows}")
    return n


def _projected_mixes(
    x: torch.Tensor, fn: torch.Tensor, eps: float, lite: bool = False
) -> tuple[torch.Tensor, int]:
    """``(x @ fn.T) * rsqrt(mean(x*x) + eps)`` in fp32, RMS over all n*C values of a token.

    Args:
        x: ``[..., n, C]`` streams of each token.
        fn: ``[n*n + 2n, n*C]`` (``[n! + 2n, n*C]`` with ``lite``).
        eps: added under the square root.
        lite: mHC-lite's layout.

    Returns:
        ``(mixes [..., rows] fp32, n)``.
    """
    if lite:
        n = x.shape[-2]
        rows, layout = math.factorial(n) + 2 * n, "n!+2n"
    else:
        n = num_streams_from_fn(fn)
        rows, layout = fn.shape[0], "n*n+2n"
    if x.shape[-2] != n or fn.shape != (rows, n * x.shape[-1]):
        raise ValueError(
            f"x [..., n, C] = {tuple(x.shape)} does not match fn [{layout}, n*C] = "
            f"{tuple(fn.shape)}"
        )
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    flat = x.flatten(-2).to(compute_dtype)
    inv_rms = torch.rsqrt(flat.pow(2).mean(dim=-1, keepdim=True) + eps)
    # RMS applied after the GEMM (same value by linearity, as in DeepSeek-V4): the fused kernel
    # computes the projection and the sum of squares in one pass over x.
    mixes = (flat @ fn.to(compute_dtype).t()) * inv_rms
    return mixes, n


def _gates_and_res_logits(mixes, base, scale, n: int, eps: float):
    """The mHC gates ``h_pre``, ``h_post`` and the gated res logits from ``mixes``.

    ``h_pre = sigmoid(.) + eps``, ``h_post = 2 sigmoid(.)`` and the res logits
    ``a_res * m_res + b_res``, from ``mixes [..., 2n + res]`` (res: n*n, or n! for mHC-lite).
    """
    base = base.to(mixes.dtype)
    scale = scale.to(mixes.dtype)
    h_pre = torch.sigmoid(scale[0] * mixes[..., :n] + base[:n]) + eps
    h_post = 2.0 * torch.sigmoid(scale[1] * mixes[..., n : 2 * n] + base[n : 2 * n])
    return h_pre, h_post, scale[2] * mixes[..., 2 * n :] + base[2 * n :]


def mhc_coefficients(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    iters: int = 20,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mHC coefficients of one site (spec section 1).

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
    h_pre, h_post, res_logits = _gates_and_res_logits(mixes, base, scale, n, eps)
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


@functools.cache
def _permutations(n: int) -> torch.Tensor:
    """``[n!, n, n]`` fp64 CPU: ``P[k, i, sigma_k(i)] = 1`` for the permutations of ``range(n)``.

    The permutations are in lexicographic order (``k = 0`` is the identity).
    """
    perms = torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long)
    return torch.nn.functional.one_hot(perms, n).to(torch.float64)


def permutation_matrices(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The ``n!`` permutation matrices ``[n!, n, n]``, identity first (see ``_permutations``).

    Row ``i`` of ``P[k]`` picks stream ``sigma_k(i)``: ``(P[k] @ X)[i] = X[sigma_k(i)]``.
    """
    if not 1 <= n <= MAX_LITE_STREAMS:
        raise ValueError(
            f"mHC-lite mixes n! permutation matrices; n={n} is outside 1..{MAX_LITE_STREAMS} "
            "(use --mhc-variant mhc for more streams)"
        )
    return _permutations(n).to(device=device, dtype=dtype)


def mhc_lite_coefficients(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC-lite coefficients (arXiv 2601.05732): exactly doubly stochastic ``H_res``.

    ``h_pre`` and ``h_post`` as in :func:`mhc_coefficients`; ``H_res = sum_k w_k P_k`` with
    ``w = softmax(a_res * m_res + b_res)`` over the ``n!`` permutation matrices ``P_k``
    (Birkhoff-von Neumann: every doubly stochastic matrix is such a convex combination). Rows
    and columns sum to 1 up to rounding, with no iterations.

    Args:
        x: ``[..., n, C]`` streams (any float dtype; math in fp32).
        fn: ``[n! + 2n, n*C]`` projection, rows ``[pre (n) | post (n) | res (n!)]``, the res
            rows in the order of :func:`permutation_matrices`.
        base: ``[n! + 2n]`` static logits, same order.
        scale: ``[3]`` gating factors ``(alpha_pre, alpha_post, alpha_res)``.
        eps: eps of the RMS and of ``h_pre``.

    Returns:
        ``(h_pre [..., n], h_post [..., n], h_res [..., n, n])``, fp32 (fp64 for fp64 input).
    """
    mixes, n = _projected_mixes(x, fn, eps, lite=True)
    h_pre, h_post, res_logits = _gates_and_res_logits(mixes, base, scale, n, eps)
    weights = torch.softmax(res_logits, dim=-1)
    perms = permutation_matrices(n, device=mixes.device, dtype=mixes.dtype)
    h_res = (weights @ perms.flatten(1)).unflatten(-1, (n, n))
    return h_pre, h_post, h_res
