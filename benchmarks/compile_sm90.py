"""Compiles every fused mHC kernel for Hopper (sm_90a) on a machine without a GPU.

The kernels are reached through their real launch code (``kernels.site``, ``kernels.coefficients``,
``kernels.pre``, ``kernels.post_res``) on training shapes, with the H100's 132 SMs for the
heuristics that depend on it, so every constexpr, tile and ``num_warps`` is what a real call
picks. A stand-in Triton driver answers "CUDA, capability 9.0" and every launch becomes a
compile-only warm-up (``JITFunction.run(..., warmup=True)``); the tensors are never touched, so
the big ones cost address space only. Each compiled kernel's PTX then goes through the ptxas
bundled with Triton (``-v``, ``sm_90a``) for registers, spills and shared memory.

    python benchmarks/compile_sm90.py                   # n in 2 4 8, C in 1280 2560 4096 7168
    python benchmarks/compile_sm90.py --streams 4 --hidden 2560 --tokens 16384 --out r.json

Run it in a process without ``TRITON_INTERPRET`` (the interpreter never compiles).
"""

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

H100_SMS = 132
# Shared memory a block may use on sm_90 (227 KiB; cudaDevAttrMaxSharedMemoryPerBlockOptin).
SM90_MAX_SHARED = 232448
STREAMS, HIDDEN, TOKENS = (2, 4, 8), (1280, 2560, 4096, 7168), (4096, 16384, 32768)
VARIANT_FLAGS = ("PRE", "SITE", "HAS_DOUT", "WRITE_DX")  # constexprs that select a code path


class _HopperDriver:
    """Just enough of a Triton driver to compile for sm_90a without a GPU."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)
        self.utils = type("Utils", (), {"get_device_properties": staticmethod(
            lambda device: {"max_shared_mem": SM90_MAX_SHARED, "multiprocessor_count": H100_SMS}
        )})()  # fmt: skip

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def compile_only(compiled: list):
    """Every ``kernel[grid](...)`` inside compiles for sm_90a and appends ``(name, kernel)``."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from mhc_megatron.kernels import coefficients

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_sm90 needs a process without TRITON_INTERPRET")
    run, num_sms = JITFunction.run, coefficients._num_sms

    def warmup(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel

    previous = driver._active  # no default driver exists without a GPU: restore, not reset
    driver.set_active(_HopperDriver())
    JITFunction.run, coefficients._num_sms = warmup, lambda device: H100_SMS
    try:
        yield
    finally:
        JITFunction.run, coefficients._num_sms = run, num_sms
        driver._active = previous


def launch_everything(n: int, C: int, T: int) -> None:
    """Runs the launch code of every kernel once on ``x [T, n, C]`` bf16 (nothing executes)."""
    from mhc_megatron.kernels import chain, coefficients, post_res, pre, site

    bf16, f32 = dict(dtype=torch.bfloat16), dict(dtype=torch.float32)
    rows, K = n * n + 2 * n, n * C
    x2, dout2 = torch.empty(T, K, **bf16), torch.empty(T, K, **bf16)
    x3, dout3 = x2.view(T, n, C), dout2.view(T, n, C)
    y, du = torch.empty(T, C, **bf16), torch.empty(T, C, **bf16)
    fn, base, scale = torch.empty(rows, K, **f32), torch.empty(rows, **f32), torch.empty(3, **f32)
    h_pre, h_post = torch.empty(T, n, **f32), torch.empty(T, n, **f32)
    h_res, mixes, inv_rms = (
        torch.empty(T, n, n, **f32),
        torch.empty(T, rows, **f32),
        torch.empty(T, **f32),
    )
    # The fused site, as the mHC layer runs it.
    site.enter_forward(x2, fn, base, scale, n, 20, 1e-6)
    post_res.post_res_forward(x3, y, h_post, h_res)
    link = site.SiteLink()
    site.exit_backward(x3, y, h_post, h_res, dout3, link)
    saved = (h_pre, h_res, mixes, inv_rms)
    site.enter_backward(x3, fn, base, scale, saved, du, h_post, h_res, link, 20, 1e-6)
    # Two sites in a row: the second's dx pass chained with the first's exit backward (n <= 4).
    if chain.chainable(n):
        after = site.SiteLink()
        after.exit_inputs = lambda: (x2, y, h_post, h_res)
        link.dout = dout2
        site.enter_backward(
            x3, fn, base, scale, saved, du, h_post, h_res, link, 20, 1e-6, after=after
        )
    # The separate ops (HC, mHC-lite, and the stream recompute's rebuild).
    coefficients._forward(x2, fn, base, scale, n, 20, 1e-6)
    coefficients._backward(x2, fn, base, scale, mixes, inv_rms, h_pre, h_post, h_res, n, 20, 1e-6)
    pre.pre_forward(x3, h_pre)
    pre.pre_backward(x3, h_pre, du)
    post_res.post_res_backward(x3, y, h_post, h_res, dout3)


_MMA_LAYOUT = re.compile(
    r"^#(mma\d*) = #ttg\.nvidia_mma<\{versionMajor = (\d+).*?warpsPerCTA = \[(\d+), (\d+)\], "
    r"instrShape = \[(\d+), (\d+)",
    re.MULTILINE,
)
_DOT_RESULT = re.compile(r"dot .*-> tensor<(\d+)x(\d+)xf32, #(mma\d*)>")


def mma_tiles(ttgir: str) -> list[dict]:
    """Each MMA of a kernel: its accumulator ``[M, N]``, the warps along M and N, and whether
    the warps cover more than the tile (then some of them repeat others' work)."""
    layouts = {m[0]: tuple(map(int, m[1:])) for m in _MMA_LAYOUT.findall(ttgir)}
    tiles = []
    for m, n, name in _DOT_RESULT.findall(ttgir):
        version, warps_m, warps_n, instr_m, instr_n = layouts[name]
        m, n = int(m), int(n)
        tiles.append({
            "mma": "wgmma" if version == 3 else "mma.sync", "tile": [m, n],
            "warps": [warps_m, warps_n],
            "repeats": warps_m * instr_m > m or warps_n * instr_n > n,
        })  # fmt: skip
    return tiles


def ptxas_report(kernel) -> dict:
    """Registers, spill bytes and shared memory of one compiled kernel (ptxas -v on its PTX)."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        proc = subprocess.run(
            [knobs.nvidia.ptxas.path, "-v", "--gpu-name=sm_90a", str(ptx), "-o", str(ptx) + ".o"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    log = proc.stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    ptx_text = kernel.asm["ptx"]
    mma = (
        "wgmma"
        if "wgmma.mma_async" in ptx_text
        else "mma.sync"
        if "mma.sync" in ptx_text
        else "none"
    )
    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "static_shared": number(r"(\d+) bytes smem"),
        "shared": int(kernel.metadata.shared),  # Triton's dynamic shared memory
        "num_warps": int(kernel.metadata.num_warps),
        "mma": mma,
        "mma_tiles": mma_tiles(kernel.asm["ttgir"]),
    }


def check(streams=STREAMS, hidden=HIDDEN, tokens=TOKENS) -> list[dict]:
    """One row per distinct compiled kernel: where it was launched and its ptxas report."""
    rows, seen = [], {}
    for n in streams:
        for C in hidden:
            for T in tokens:
                compiled: list = []
                with compile_only(compiled):
                    launch_everything(n, C, T)
                for name, kernel in compiled:
                    key = kernel.hash
                    if key not in seen:
                        params = kernel.src.fn.arg_names  # constants are keyed by (position,)
                        seen[key] = {"kernel": name, "constants": {
                            params[k[0]]: v for k, v in kernel.src.constants.items()
                            if isinstance(v, (int, float, str, bool))
                        }, "shapes": [], **ptxas_report(kernel)}  # fmt: skip
                        rows.append(seen[key])
                    seen[key]["shapes"].append([n, C, T])
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, nargs="+", default=list(STREAMS))
    parser.add_argument("--hidden", type=int, nargs="+", default=list(HIDDEN))
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = check(args.streams, args.hidden, args.tokens)
    head = ("kernel", "variant", "n", "warps", "regs", "spill", "shared", "mma", "repeats")
    print("{:22s} {:14s} {:>2s} {:>5s} {:>5s} {:>6s} {:>7s} {:>9s} {:>7s}  shapes".format(*head))
    for r in rows:
        spill = r["spill_stores"] + r["spill_loads"]
        flags = {k: v for k, v in r["constants"].items() if k in VARIANT_FLAGS and v is True}
        variant = ",".join(flags) or "-"
        print(f"{r['kernel']:22s} {variant:14s} {r['shapes'][0][0]:2d} {r['num_warps']:5d} "
              f"{r['registers']:5d} {spill:6d} {r['shared']:7d} {r['mma']:>9s} "
              f"{sum(t['repeats'] for t in r['mma_tiles']):7d}  {len(r['shapes'])}")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"sm90_max_shared": SM90_MAX_SHARED, "kernels": rows}, indent=2) + "\n"
        )
    return rows


if __name__ == "__main__":
    main()
