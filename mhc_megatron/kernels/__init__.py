"""Fused Triton kernels of the mHC site, forward and backward, one op per module.

Each function has the signature of its :mod:`mhc_megatron.ops` counterpart (the reference it is
tested against): ``mhc_coefficients`` (plus ``deterministic``), ``mhc_pre``, ``mhc_post_res``.
``mhc_site_enter`` then ``mhc_site_exit`` (module ``site``) run one whole site, the three ops
with a backward that writes ``dx`` once.
They are imported on first access, not with this package: ``TRITON_INTERPRET`` (Triton's CPU
interpreter, used by the tests) is read when a kernel is defined.
"""

import importlib

MAX_STREAMS = 8
"""Largest n the kernels take: a token's n x n matrix and an [n, BLOCK_C] tile live in
registers."""


def unsupported_num_streams(n: int) -> str | None:
    """Why the kernels cannot take ``n`` streams, saying what to change; None when they can.

    The one check of n against the kernels: the kernel entry points, the config's validation
    and ``--mhc-backend auto`` all ask here.
    """
    if 1 <= n <= MAX_STREAMS:
        return None
    return (
        f"mhc_num_streams={n} is not supported by the fused kernels (n <= {MAX_STREAMS}); "
        "use --mhc-backend torch"
    )


_MODULE_OF = {
    "mhc_coefficients": "coefficients",
    "mhc_pre": "pre",
    "mhc_post_res": "post_res",
    "mhc_site_enter": "site",
    "mhc_site_exit": "site",
}

__all__ = ["MAX_STREAMS", "unsupported_num_streams", *_MODULE_OF]


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
