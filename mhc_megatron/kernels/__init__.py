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

_MODULE_OF = {
    "mhc_coefficients": "coefficients",
    "mhc_pre": "pre",
    "mhc_post_res": "post_res",
    "mhc_site_enter": "site",
    "mhc_site_exit": "site",
}

__all__ = ["MAX_STREAMS", *_MODULE_OF]


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
