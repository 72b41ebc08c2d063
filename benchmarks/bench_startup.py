"""Start-up and exit of a process that loads torch and Megatron-Core, as a training rank does.

Four child processes, each importing torch, ``megatron.core`` and ``megatron.training.training``
and then exiting, timed from the parent (wall seconds, median over ``--repeats``, the variants
interleaved so that a busy moment hits them alike):

- ``compiled_collected``: Megatron imported as released (its fusions decorated with
  ``torch.compile``), the interpreter's last garbage collection at exit;
- ``uncompiled_collected``: through ``mhc_megatron.megatron_import.import_megatron_uncompiled``
  (what CPU mode and the data tool do);
- ``compiled_frozen``: ``mhc_megatron.processes.skip_final_collection()`` before the exit (what
  ``pretrain_mhc.py`` and the tools do);
- ``uncompiled_frozen``: both, as a CPU rank now starts and ends.

Ratios written to the JSON: ``uncompiled/compiled`` and ``frozen/collected`` (each change alone)
and ``both/neither``. Each child also reports whether dynamo got imported.

Usage::

    python benchmarks/bench_startup.py                  # 5 repeats
    python benchmarks/bench_startup.py --repeats 1 --out /tmp/startup.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # runs from a plain checkout: the GPU machine has no install

from benchmarks.harness import write_result  # noqa: E402

VARIANTS = ("compiled_collected", "uncompiled_collected", "compiled_frozen", "uncompiled_frozen")

CHILD = """
import json, sys, warnings
warnings.simplefilter("ignore")
import torch
if {uncompiled}:
    from mhc_megatron.megatron_import import import_megatron_uncompiled
    import_megatron_uncompiled()
import megatron.core
import megatron.training.training
print(json.dumps({{"dynamo_imported": "torch._dynamo" in sys.modules,
                  "modules": len(sys.modules)}}))
if {frozen}:
    from mhc_megatron.processes import skip_final_collection
    skip_final_collection()
"""


def run_child(variant: str) -> tuple[float, dict]:
    """One child process of ``variant``: ``(wall seconds, what it reported)``."""
    code = CHILD.format(uncompiled=variant.startswith("uncompiled"),
                        frozen=variant.endswith("frozen"))  # fmt: skip
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    """Runs the four variants and writes the JSON (module docstring); returns what it wrote."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="children per variant (5)")
    parser.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    reports: dict[str, dict] = {}
    for _ in range(args.repeats):
        for variant in VARIANTS:
            seconds, reports[variant] = run_child(variant)
            times[variant].append(seconds)
    median = {v: statistics.median(t) for v, t in times.items()}
    import torch

    data = {
        "meta": {
            "device_name": "cpu", "cpus": os.cpu_count(), "repeats": args.repeats,
            "python": platform.python_version(), "torch": torch.__version__,
            "megatron_core": importlib.metadata.version("megatron-core"),
            "method": "wall time of a child process from the parent's side, median",
        },
        "seconds": median,
        "all_seconds": times,
        "children": reports,
        "ratios": {
            "uncompiled/compiled": median["uncompiled_collected"] / median["compiled_collected"],
            "frozen/collected": median["uncompiled_frozen"] / median["uncompiled_collected"],
            "both/neither": median["uncompiled_frozen"] / median["compiled_collected"],
        },
    }  # fmt: skip
    for variant in VARIANTS:
        print(f"{variant:22s} {median[variant]:6.2f} s  {reports[variant]}")
    for name, ratio in data["ratios"].items():
        print(f"{name:22s} {ratio:6.3f}")
    write_result(data, args.out, "startup")
    return data


if __name__ == "__main__":
    main()
