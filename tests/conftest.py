"""Test-session setup: Triton kernels run in Triton's interpreter when there is no GPU.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is defined, so it is set here, before
any test module imports ``mhc_megatron.kernels``. ``tests/launching.py`` removes it again for the
training processes it starts.
"""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The folder whose modules switch this process to CPU mode (training/cpu.py; its conftest.py),
# which refuses once CUDA is initialised. On a machine with a GPU the kernel tests initialise it,
# so there this folder runs in a child pytest with the GPU hidden
# (tests/e2e/test_cpu_mode_modules.py); on a CPU-only machine it runs here.
CPU_MODE_DIR = Path(__file__).resolve().parent / "megatron"
CPU_MODE_CHILD = "MHC_TESTS_CPU_MODE_CHILD"  # set in that child


# Modules whose tests launch training processes, train models or run Triton's interpreter over
# large shapes (each test seconds to a minute on a 2-core machine). `pytest -m "not slow"` leaves
# them out: the quick subset (math, kernels on small shapes, configs, checks, tools).
SLOW_MODULES = (
    "test_parallel_layouts.py", "test_pretrain_mhc.py", "test_slurm.py", "test_run_safety.py",
    "test_stability.py", "test_sweep_end_to_end.py", "test_device_check.py", "test_cpu_mode.py",
    "test_cpu_mode_modules.py", "test_recipes.py", "test_bench_recompute.py",
    "test_bench_step.py", "test_bench_mhc_site.py", "test_bench_traffic.py",
    "test_kernels_chain.py", "test_docker_image.py", "test_bench_startup.py",
)  # fmt: skip


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: launches or trains (left out by -m 'not slow')")


# The longest modules start first (seconds on two workers, measured 2026-12-05), then the rest
# in collection order: pytest-xdist hands a free worker the next whole module in this order
# (pyproject's --no-loadscope-reorder; by default it orders by the number of tests), and a long
# one started last would run alone at the end. A stale order costs balance, nothing else.
LONGEST_FIRST = (
    "test_parallel_layouts.py",  # 277
    "test_run_safety.py",  # 158
    "test_pretrain_mhc.py",  # 78
    "test_device_check.py",  # 76
    "test_docker_image.py",  # 75
    "test_slurm.py",  # 68
    "test_kernels_chain.py",  # 59
    "test_stability.py",  # 58
    "test_recipes.py",  # 45
    "test_sweep_end_to_end.py",  # 44
    "test_cpu_mode.py",  # 42
    "test_kernels_site.py",  # 25
    "test_bench_mhc_site.py",  # 23
    "test_bench_traffic.py",  # 18
    "test_stream_recompute.py",  # 17
    "test_kernels_coefficients.py",  # 17
    "test_bench_startup.py",  # 16
)


def pytest_collection_modifyitems(config, items):
    def start_order(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=start_order)  # stable: the order within a module and among the rest is kept
    for item in items:
        if item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
    if not torch.cuda.is_available() or os.environ.get(CPU_MODE_CHILD):
        return
    kept = [item for item in items if item.path.parent != CPU_MODE_DIR]
    moved = [item for item in items if item.path.parent == CPU_MODE_DIR]
    if moved:
        config.hook.pytest_deselected(items=moved)
        items[:] = kept
