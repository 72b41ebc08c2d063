"""``mhc_megatron/megatron_import.py`` and ``processes.skip_final_collection``: what every CPU
rank and the data tool do at start and at exit to spare their start-up and shut-down time. Run
in a child process: this one has imported Megatron already."""

import subprocess
import sys

CHILD = r"""
import gc, sys, torch
compile_ = torch.compile
from mhc_megatron.megatron_import import import_megatron_uncompiled
import_megatron_uncompiled()
from megatron.core import jit
from megatron.core.fusions import fused_bias_swiglu
from megatron.core.transformer.moe import router
import megatron.training.training
print("dynamo imported:", "torch._dynamo" in sys.modules)
print("torch.compile restored:", torch.compile is compile_)
print("jit_fuser is a no-op:", jit.jit_fuser is jit.noop_decorator)
# Decorated at import (jit_fuser, and torch.compile itself in the router): plain functions.
for fn in (fused_bias_swiglu.swiglu, router.InferenceTopKRouter._compiled_topk_routing):
    compiled = hasattr(fn, "_torchdynamo_orig_callable")
    print("plain function:", type(fn).__name__ == "function" and not compiled)
import_megatron_uncompiled()  # a second call: nothing to do
from mhc_megatron.processes import skip_final_collection
skip_final_collection()
print("frozen objects:", gc.get_freeze_count() > 100_000)
"""


def test_megatron_imports_without_compiling_and_the_exit_skips_the_last_collection():
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300, check=True
    ).stdout
    assert out.splitlines() == [
        "dynamo imported: False",
        "torch.compile restored: True",
        "jit_fuser is a no-op: True",
        "plain function: True",
        "plain function: True",
        "frozen objects: True",
    ], out
