"""On a machine with a GPU: the CPU-mode test modules, in a child pytest with the GPU hidden.

CPU mode (``mhc_megatron.training.cpu.enable_cpu_mode``) cannot start in a process that has
initialised CUDA, and the kernel tests initialise it. ``tests/conftest.py`` takes tests/megatron
out of the session there and this test runs them in a fresh process; on a CPU-only machine they
run in the session itself and this test has nothing to add.
"""

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import CPU_MODE_CHILD, CPU_MODE_DIR


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU: the CPU-mode modules run in this session"
)
def test_cpu_mode_modules_in_a_child_process():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1", **{CPU_MODE_CHILD: "1"})
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CPU_MODE_DIR)],
        cwd=CPU_MODE_DIR.parents[1], env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
