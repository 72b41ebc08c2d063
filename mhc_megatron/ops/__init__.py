"""The mHC math of ``docs/mhc-spec.md`` in plain PyTorch: the reference every kernel matches.

Shapes: ``n`` streams of width ``C``; per token the residual is ``x [..., n, C]``.
"""

from mhc_megatron.ops.coefficients import (
    MAX_LITE_STREAMS,
    hc_coefficients,
    mhc_coefficients,
    mhc_lite_coefficients,
    num_streams_from_fn,
    permutation_matrices,
)
from mhc_megatron.ops.mix import mhc_post_res, mhc_pre
from mhc_megatron.ops.sinkhorn import sinkhorn
from mhc_megatron.ops.streams import collapse_head, collapse_mean, expand_streams

__all__ = [
    "MAX_LITE_STREAMS",
    "collapse_head",
    "collapse_mean",
    "expand_streams",
    "hc_coefficients",
    "mhc_coefficients",
    "mhc_lite_coefficients",
    "mhc_post_res",
    "mhc_pre",
    "num_streams_from_fn",
    "permutation_matrices",
    "sinkhorn",
]
