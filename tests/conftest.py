"""Test-session setup: Triton kernels run in Triton's interpreter when there is no GPU.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is defined, so it is set here, before
any test module imports ``mhc_megatron.kernels``. ``tests/launching.py`` removes it again for the
training processes it starts.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Modules that switch this process to CPU mode (training/cpu.py), which refuses once CUDA is
# initialised. On a machine with a GPU the kernel tests initialise it, so there these modules
# run in a child pytest with the GPU hidden (tests/test_cpu_mode_modules.py); on a CPU-only
# machine they run here.
CPU_MODE_MODULES = ("test_mhc_model.py", "test_grouped_experts.py")
CPU_MODE_CHILD = "MHC_TESTS_CPU_MODE_CHILD"  # set in that child


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available() or os.environ.get(CPU_MODE_CHILD):
        return
    kept = [item for item in items if item.path.name not in CPU_MODE_MODULES]
    moved = [item for item in items if item.path.name in CPU_MODE_MODULES]
    if moved:
        config.hook.pytest_deselected(items=moved)
        items[:] = kept
