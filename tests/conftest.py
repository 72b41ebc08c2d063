"""Test-session setup: Triton kernels run in Triton's interpreter when there is no GPU.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is defined, so it is set here, before
any test module imports ``mhc_megatron.kernels``. ``tests/launching.py`` removes it again for the
training processes it starts.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
