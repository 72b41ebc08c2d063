"""Import Megatron-Core with its fusions left as plain PyTorch, for processes that never run them.

``megatron/core/jit.py:21`` (megatron-core 0.19.2) makes ``jit_fuser`` ``torch.compile``, and
importing Megatron-Core decorates about 25 functions with it (``moe/router.py:918`` with
``torch.compile`` itself). The first decoration imports dynamo and inductor. Uncompiled, a
process that loads Megatron starts and exits in 0.62x the time (``benchmarks/bench_startup.py``).
CPU mode (``training/cpu.py``: its flags turn the fusions off, and on CPU they would only build
C++ kernels) and the data tool (which only writes indexed datasets) import Megatron through
:func:`import_megatron_uncompiled` instead. A GPU run imports Megatron as it is.
"""

import sys

import torch


def import_megatron_uncompiled() -> None:
    """Import ``megatron.core`` with ``torch.compile`` passing functions through.

    Then ``jit.disable_jit_fuser()`` (Megatron's own switch), so that modules imported later
    decorate with a no-op too; ``torch.compile`` itself is restored. Does nothing where
    ``megatron.core`` is imported already: its functions are decorated by then.
    """
    if "megatron.core" in sys.modules:
        return
    compile_ = torch.compile

    def leave_uncompiled(model=None, **options):
        return model if model is not None else (lambda function: function)

    torch.compile = leave_uncompiled
    try:
        from megatron.core import jit

        jit.disable_jit_fuser()
    finally:
        torch.compile = compile_
