"""The pieces the benchmark scripts share: device timing, copy bandwidth, run metadata, a
single-rank process group and writing the JSON result.

Imports only torch at module level: Megatron and the kernels are imported where they are used,
so a script can still set ``TRITON_INTERPRET`` or enable CPU mode before they load.
"""

import importlib.metadata
import json
import os
import platform
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


class Timer:
    """Per-rep timing of a callable: CUDA events per rep, read after one synchronize at the end;
    ``time.perf_counter`` on CPU.

    Args:
        device: Where the timed work runs.
        iters: Timed reps when ``samples_ms`` is not given ``iters``.
        warmup: Untimed reps before them when ``samples_ms`` is not given ``warmup``.
        flush: Whether reps evict L2 first when ``samples_ms`` is not given ``flush``.
    """

    def __init__(self, device: torch.device, iters: int = 1, warmup: int = 0, flush: bool = False):
        self.cuda, self.iters, self.warmup, self.flush = device.type == "cuda", iters, warmup, flush
        # 256 MiB zeroed before a rep evicts the H100's 50 MiB L2: no rep reads the last one's data.
        self.buffer = torch.empty(2**28, dtype=torch.uint8, device=device) if self.cuda else None

    def samples_ms(
        self,
        run: Callable,
        iters: int | None = None,
        warmup: int | None = None,
        flush: bool | None = None,
        prepare: Callable[[], object] | None = None,
        leaves: Iterable[torch.Tensor] = (),
    ) -> list[float]:
        """Milliseconds of each timed rep of ``run``.

        Args:
            run: The timed call: ``run(prepare())`` where ``prepare`` is given, else ``run()``.
            iters: Timed reps (default: the timer's).
            warmup: Untimed reps before them (default: the timer's).
            flush: Zero the L2-sized buffer before each rep, untimed; CUDA only (default: the
                timer's).
            prepare: Untimed setup before each rep; its result is passed to ``run``.
            leaves: Tensors whose ``.grad`` is set to ``None`` before each rep, untimed.

        Returns:
            One sample per timed rep, in milliseconds.
        """
        iters = self.iters if iters is None else iters
        warmup = self.warmup if warmup is None else warmup
        flush = self.flush if flush is None else flush
        samples = []
        for i in range(warmup + iters):
            for t in leaves:
                t.grad = None  # backward writes fresh grads: accumulation is not timed
            state = () if prepare is None else (prepare(),)
            if flush and self.cuda:
                self.buffer.zero_()
            if self.cuda:
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                run(*state)
                end.record()
                sample = (start, end)
            else:
                t0 = time.perf_counter()
                run(*state)
                sample = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                samples.append(sample)
        if self.cuda:
            torch.cuda.synchronize()  # every event has completed before it is read
            samples = [start.elapsed_time(end) for start, end in samples]
        return samples


def copy_bandwidth(device: torch.device, timer: Timer, warmup: int | None = None) -> dict:
    """Device copy bandwidth: ``dst.copy_(src)`` on 1 GiB (CPU 64 MiB), bytes = 2 * size.

    Args:
        device: The device measured.
        timer: Times the copies; its ``flush`` default applies.
        warmup: Untimed copies before the 20 timed ones (default: the timer's).

    Returns:
        ``bytes``, ``best_ms`` (best of 20), ``GBps`` and ``method``.
    """
    numel = 2**30 if device.type == "cuda" else 2**26
    src = torch.ones(numel, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = min(timer.samples_ms(lambda: dst.copy_(src), iters=20, warmup=warmup))
    method = "dst.copy_(src) on uint8 buffers, bytes = 2 * size, best of 20"
    return {"bytes": 2 * numel, "best_ms": best, "GBps": 2 * numel / best / 1e6, "method": method}


def version(package: str) -> str | None:
    """The installed distribution's version, ``None`` where it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_meta(device: torch.device, packages: Iterable[str]) -> dict:
    """``device``, ``device_name``, ``host`` and ``versions`` (of ``packages``, CUDA, Python)."""
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "host": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "versions": {p: version(p) for p in packages}
        | {"cuda": torch.version.cuda, "python": platform.python_version()},
    }


def init_single_rank(device: torch.device | str) -> None:
    """A one-rank process group and Megatron's model-parallel state (all sizes 1).

    On CPU, enables the project's CPU mode first (it must precede Megatron's import) and uses
    gloo; on CUDA, selects GPU 0 and uses nccl. ``MASTER_ADDR``/``MASTER_PORT`` default to
    localhost and a free port.
    """
    cpu = torch.device(device).type == "cpu"
    if cpu:
        from mhc_megatron.training.cpu import enable_cpu_mode

        enable_cpu_mode()  # Megatron's hard-coded CUDA calls run on CPU from here on
    else:
        torch.cuda.set_device(0)
    from mhc_megatron.processes import init_single_rank

    init_single_rank("gloo" if cpu else "nccl")


def write_json(out: Path, data: dict) -> None:
    """Writes ``data`` to ``out`` as indented JSON, creating its folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")


def write_result(data: dict, out: Path | None, prefix: str) -> None:
    """Writes a result whose ``meta`` names the device, then prints where.

    Args:
        data: The result; ``data["meta"]["device_name"]`` names the default file.
        out: The file; ``None`` for ``benchmarks/results/<prefix>_<device name slug>.json``.
        prefix: Start of the default file's name.
    """
    slug = re.sub(r"[^a-z0-9]+", "_", data["meta"]["device_name"].lower()).strip("_")
    out = out or RESULTS / f"{prefix}_{slug}.json"
    write_json(out, data)
    print(f"\nwrote {out}")
