"""Which implementation of the mHC ops a site runs: plain PyTorch or the fused Triton kernels."""

import functools
import os
import types

import torch

from mhc_megatron import ops
from mhc_megatron.kernels import unsupported_num_streams
from mhc_megatron.megatron.config import MHCConfigError, MHCTransformerConfig


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _kernels() -> types.SimpleNamespace:
    """The fused kernels, imported on first use.

    ``TRITON_INTERPRET`` is read when the kernels are defined, so importing them early would fix
    the mode before tests can choose it.
    """
    from mhc_megatron.kernels import site
    from mhc_megatron.kernels.coefficients import mhc_coefficients
    from mhc_megatron.kernels.post_res import mhc_post_res
    from mhc_megatron.kernels.pre import mhc_pre

    return types.SimpleNamespace(
        mhc_coefficients=mhc_coefficients, mhc_pre=mhc_pre, mhc_post_res=mhc_post_res, site=site
    )


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(config: MHCTransformerConfig, device: torch.device) -> str:
    """``torch`` or ``triton`` for a site whose streams live on ``device``.

    Raises:
        MHCConfigError: ``--mhc-backend triton`` where the kernels cannot run (no Triton, or a
            CPU device without Triton's interpreter).
    """
    if config.mhc_backend == "torch":
        return "torch"
    if config.mhc_backend == "auto":
        supported = unsupported_num_streams(config.mhc_num_streams) is None
        return "triton" if device.type == "cuda" and supported and _triton_importable() else "torch"
    if not _triton_importable():
        raise MHCConfigError(
            "--mhc-backend triton needs the triton package; install it or use --mhc-backend torch"
        )
    if device.type != "cuda" and not _interpreting():
        raise MHCConfigError(
            f"--mhc-backend triton needs CUDA tensors, got {device.type} (Triton's interpreter, "
            "TRITON_INTERPRET=1, runs them on CPU for tests); use --mhc-backend torch or auto"
        )
    return "triton"


_TORCH_OPS = types.SimpleNamespace(
    mhc_coefficients=ops.mhc_coefficients,
    mhc_pre=ops.mhc_pre,
    mhc_post_res=ops.mhc_post_res,
    fused_site=None,
)


def site_ops(config: MHCTransformerConfig, device: torch.device):
    """The functions a site calls, on the torch ops or on the fused kernels.

    ``mhc_coefficients``, ``mhc_pre``, ``mhc_post_res``, with the signatures of
    :mod:`mhc_megatron.ops` (the kernels' coefficients also take ``deterministic``, bound here
    from ``config.deterministic_mode``), and ``fused_site``: the module
    :mod:`mhc_megatron.kernels.site` where an mHC site runs whole on the kernels (one ``dx``
    pass in backward), else None (torch ops; HC and mHC-lite, whose coefficients are torch ops,
    use the separate mixes).
    """
    if resolve_backend(config, device) == "torch":
        return _TORCH_OPS
    kernels = _kernels()
    return types.SimpleNamespace(
        mhc_coefficients=functools.partial(
            kernels.mhc_coefficients, deterministic=config.deterministic_mode
        ),
        mhc_pre=kernels.mhc_pre,
        mhc_post_res=kernels.mhc_post_res,
        fused_site=kernels.site if config.mhc_variant == "mhc" else None,
    )
