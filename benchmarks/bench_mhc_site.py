"""Benchmark of one mHC site: fused Triton kernels against eager PyTorch, torch.compile,
Liger-Kernel, a plain residual add and the memory floor, all measured in one run.

Per token ``x [n, C]`` (spec section 1): ``(h_pre, h_post, h_res) = mhc_coefficients(x, fn, base,
scale)``, ``u = mhc_pre(x, h_pre)``, ``y = u`` (stands in for the branch), ``x_next =
mhc_post_res(x, y, h_post, h_res)``. Each op and the whole site are timed forward, backward and
forward+backward on ``x: [T, n, C]``; for ours also ``row``, two sites in a row whose backward
passes chain (``kernels.chain``), against twice one site. ``benchmarks/README.md`` describes the
JSON it writes.

    python benchmarks/bench_mhc_site.py                 # GPU: n=4, C in 1280 2560 4096, T=16384
    python benchmarks/bench_mhc_site.py --device cpu    # smoke run: CPU numbers mean nothing
"""

import argparse
import importlib
import inspect
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # runs from a plain checkout: the GPU machine has no install

from benchmarks.harness import Timer, copy_bandwidth, device_meta, write_result  # noqa: E402
from mhc_megatron import ops as eager_ops  # noqa: E402

IMPLS = ("ours", "eager", "compile", "liger", "residual")
TARGETS = ("coefficients", "pre", "post_res", "site", "row")
MODES = ("fwd", "bwd", "fwd_bwd")
KERNEL_MODULES = ("coefficients", "pre", "post_res")  # mhc_megatron.kernels.<module>, in that order
ITERS, EPS = 20, 1e-6  # Sinkhorn iterations and eps of the spec
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# worst max_rel against eager above this prints a warning (loose: flags bugs, not rounding).
TOLERANCE = {"bf16": 5e-2, "fp16": 1e-2, "fp32": 1e-3}
PAIRS = (("ours", "floor"), ("ours", "eager"), ("ours", "compile"), ("ours", "liger"))
PAIRS += (("eager", "floor"), ("compile", "floor"), ("liger", "floor"))
METHOD = {
    "timing": "each rep: .grad = None on every leaf, then (CUDA) zero a 256 MiB buffer to evict "
    "L2, both untimed, and CUDA events around the call, one synchronize after all reps; (CPU) "
    "time.perf_counter around the call. Median (timings_ms) and min (timings_min_ms) of --iters "
    "reps after --warmup untimed reps. fwd runs with autograd recording, as in training.",
    "backward": "timed on its own: each rep runs an untimed forward (a fresh graph), then times "
    "torch.autograd.backward(outputs, fixed random grad_outputs); no retain_graph, so "
    "torch.compile's donated buffers stay allowed",
    "correctness": "one fwd+bwd of every implementation against eager at the benchmark shape, "
    "outputs and all leaf grads; max_rel = max|got - ref| / max|ref|",
    "first_call_s": "wall seconds of the first fwd+bwd: torch.compile's compile time, Triton's JIT",
}
FLOOR_DEFINITION = {
    "site": "project definition: fwd+bwd moves (6n+5)*T*C*elem bytes (elem = 2 for bf16 "
    "streams). fwd (3n+2)*T*C*elem: read x once for coefficients+pre, write u, read x and y again "
    "after the branch, write x_next; bwd the rest, (3n+3)*T*C*elem. Coefficients, params uncounted",
    "row": "two sites in a row (the second on the first's output, same parameters): twice the "
    "site's floor",
    "ops": "each op reads every input and writes every output once; backward recomputes from its "
    "inputs (nothing saved) and writes every input grad; formulas in floor_bytes()",
    "time": "floor_ms = bytes / copy bandwidth measured in this run",
}


@dataclass
class Impl:
    """One implementation of the three ops, with our signatures, and the site built from them."""

    coefficients: Callable
    pre: Callable
    post_res: Callable
    site: Callable
    row: Callable  # two sites in a row (same parameters): ours chains their backward passes


@dataclass
class Case:
    """One timed unit: ``fwd()`` returns the outputs; ``leaves`` receive grads."""

    fwd: Callable[[], tuple]
    out_names: tuple[str, ...]
    leaves: dict[str, torch.Tensor]
    grad_outs: tuple[torch.Tensor, ...]


def from_ops(coefficients: Callable, pre: Callable, post_res: Callable) -> Impl:
    """Builds ``site(x [T, n, C], fn, base, scale) -> x_next [T, n, C]`` from three ops."""

    def site(x, fn, base, scale):
        h_pre, h_post, h_res = coefficients(x, fn, base, scale, iters=ITERS, eps=EPS)
        y = pre(x, h_pre)  # the branch F is the identity: only the mHC work is timed
        return post_res(x, y, h_post, h_res)

    def row(x, fn, base, scale):
        return site(site(x, fn, base, scale), fn, base, scale)

    return Impl(coefficients, pre, post_res, site, row)


def liger_impl(device: torch.device) -> Impl:
    """Liger-Kernel's mHC (``liger_kernel.transformers.functional``, >= 0.8.3) behind our API.

    Bridged: Liger's ``phi [n*C, n*n+2n]`` is our ``fn.T`` (passed as a view; Liger copies it
    contiguous, a few MB), its gates are three 0-d tensors, its ``pre_eps`` defaults to 0 (the spec
    adds eps). Not bridged: Liger's Sinkhorn starts from a row softmax and ends on a column
    normalisation (the spec ends on rows), so its h_res differs from eager by the convergence error.
    """
    if device.type != "cuda":
        raise RuntimeError("Liger's mHC is CUDA-only (liger_mhc_coeffs asserts x.is_cuda)")
    try:
        lk = importlib.import_module("liger_kernel.transformers.functional")
        lk.liger_mhc_coeffs  # noqa: B018 (older releases have mHC in liger_kernel.ops.mhc only)
    except (ImportError, AttributeError):
        lk = importlib.import_module("liger_kernel.ops.mhc")
    wanted = {"allow_fp32", "tmax", "rms_eps", "pre_eps", "sinkhorn_eps", "post_mult"}
    missing = wanted - set(inspect.signature(lk.liger_mhc_coeffs).parameters)
    if missing:
        raise RuntimeError(f"liger_mhc_coeffs lacks {sorted(missing)}: not the API adapted here")

    def coefficients(x, fn, base, scale, iters=ITERS, eps=EPS):
        fp32, a = x.dtype == torch.float32, scale
        return lk.liger_mhc_coeffs(
            x, fn.t(), base, a[0], a[1], a[2], allow_fp32=fp32, tmax=iters, rms_eps=eps,
            pre_eps=eps, sinkhorn_eps=eps, post_mult=2.0,
        )  # fmt: skip

    return from_ops(coefficients, lk.liger_mhc_pre, lk.liger_mhc_post_res)


def load_impl(name: str, device: torch.device) -> Impl | None:
    """Implementation ``name`` (``None`` for ``residual``, which needs no ops); raises, with the
    reason, where it cannot run."""
    if name == "eager":
        return from_ops(eager_ops.mhc_coefficients, eager_ops.mhc_pre, eager_ops.mhc_post_res)
    if name == "ours":  # imported lazily: TRITON_INTERPRET is read when kernels are defined
        mods = [importlib.import_module(f"mhc_megatron.kernels.{m}") for m in KERNEL_MODULES]
        impl = from_ops(mods[0].mhc_coefficients, mods[1].mhc_pre, mods[2].mhc_post_res)
        fused = importlib.import_module("mhc_megatron.kernels.site")

        def site(x, fn, base, scale):  # what the mHC layer runs: one dx pass in backward
            u, _, h_post, h_res, link = fused.mhc_site_enter(x, fn, base, scale, ITERS, EPS)
            return fused.mhc_site_exit(x, u, h_post, h_res, link)

        def row(x, fn, base, scale):  # the second site's dx pass does the first's exit backward
            u, _, h_post, h_res, link = fused.mhc_site_enter(x, fn, base, scale, ITERS, EPS)
            x = fused.mhc_site_exit(x, u, h_post, h_res, link)
            u, _, h_post, h_res, second = fused.mhc_site_enter(
                x, fn, base, scale, ITERS, EPS, after=link
            )
            return fused.mhc_site_exit(x, u, h_post, h_res, second)

        impl.site, impl.row = site, row
        return impl
    if name == "compile":  # each op and the whole site compiled on their own, mode default
        e = load_impl("eager", device)
        return Impl(*(torch.compile(f, dynamic=False) for f in vars(e).values()))
    if name == "liger":
        return liger_impl(device)
    if name == "residual":
        return None
    raise ValueError(f"unknown implementation {name!r}; choose from {', '.join(IMPLS)}")


def make_data(n: int, C: int, T: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Leaves and fixed output grads shared by every implementation (same numbers for all)."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, dt=torch.float32, std=1.0, leaf=True):
        t = (std * torch.randn(*shape, generator=gen, device=device)).to(dt)
        return t.requires_grad_(leaf)

    K = n * n + 2 * n
    # fn ~ N(0, 1) makes the RMS-normalised mixes ~ N(0, n*C), so scale 0.01 gives O(1) logits:
    # h_res is then far from uniform and a wrong Sinkhorn shows in the check.
    d = {"x": rand(T, n, C, dt=dtype), "fn": rand(K, n * C), "base": rand(K, std=0.5)}
    d["scale"] = torch.full((3,), 0.01, device=device).requires_grad_()
    with torch.no_grad():
        coeffs = eager_ops.mhc_coefficients(d["x"], d["fn"], d["base"], d["scale"], ITERS, EPS)
    for key, h in zip(("h_pre", "h_post", "h_res"), coeffs, strict=True):
        d[key] = h.contiguous().requires_grad_()
    d |= {"y": rand(T, C, dt=dtype), "rx": rand(T, C, dt=dtype), "ry": rand(T, C, dt=dtype)}
    d["g_coef"] = (rand(T, n, leaf=False), rand(T, n, leaf=False), rand(T, n, n, leaf=False))
    d["g_u"], d["g_x"] = rand(T, C, dt=dtype, leaf=False), rand(T, n, C, dt=dtype, leaf=False)
    return d


def make_case(name: str, impl: Impl | None, target: str, d: dict) -> Case:
    """The fwd closure, leaves and output grads of ``target`` for one implementation."""
    x, fn, base, scale = d["x"], d["fn"], d["base"], d["scale"]
    params = {"x": x, "fn": fn, "base": base, "scale": scale}
    if name == "residual":  # x + y on [T, C]: what a plain pre-norm residual pays
        rx, ry = d["rx"], d["ry"]
        return Case(lambda: (rx + ry,), ("out",), {"x": rx, "y": ry}, (d["g_u"],))
    if target == "coefficients":
        fwd = lambda: tuple(impl.coefficients(x, fn, base, scale, iters=ITERS, eps=EPS))  # noqa: E731
        return Case(fwd, ("h_pre", "h_post", "h_res"), params, d["g_coef"])
    if target == "pre":
        leaves = {"x": x, "h_pre": d["h_pre"]}
        return Case(lambda: (impl.pre(*leaves.values()),), ("u",), leaves, (d["g_u"],))
    if target == "post_res":
        leaves = {"x": x, "y": d["y"], "h_post": d["h_post"], "h_res": d["h_res"]}
        return Case(lambda: (impl.post_res(*leaves.values()),), ("x_next",), leaves, (d["g_x"],))
    run = impl.row if target == "row" else impl.site
    return Case(lambda: (run(*params.values()),), ("x_next",), params, (d["g_x"],))


def floor_bytes(n: int, T: int, C: int, elem: int) -> dict[str, dict[str, int]]:
    """Least bytes each target must move, per mode (``FLOOR_DEFINITION`` says what counts).

    ``S = T*C*elem`` is one ``[T, C]`` stream-width tensor; coefficients are fp32 (4 bytes),
    ``K = n*n + 2n`` per token; ``P = K*n*C*4`` is the fp32 projection ``fn``.
    """
    S, K = T * C * elem, n * n + 2 * n
    P, H, hp, hpr = K * n * C * 4, T * K * 4, T * n * 4, T * (n + n * n) * 4
    fwd_bwd = {
        # fwd: read x, fn; write h_pre, h_post, h_res (H).
        # bwd: read x, fn, the three coefficient grads (H); write grad_x, grad_fn.
        "coefficients": (n * S + P + H, n * S + P + H + n * S + P),
        # fwd: read x, h_pre; write u.
        # bwd: read grad_u, x (for grad_h_pre), h_pre; write grad_x, grad_h_pre.
        "pre": (n * S + hp + S, S + n * S + hp + n * S + hp),
        # fwd: read x, y, h_post and h_res; write x_next. bwd: read grad_x_next, x (for grad_h_res),
        # y (for grad_h_post), h_post and h_res; write grad_x, grad_y, grad_h_post, grad_h_res.
        "post_res": (2 * n * S + S + hpr, 2 * n * S + S + hpr + n * S + S + hpr),
        "site": ((3 * n + 2) * S, (3 * n + 3) * S),  # sums to the project's (6n+5)*T*C*elem
        "row": (2 * (3 * n + 2) * S, 2 * (3 * n + 3) * S),  # two sites
    }
    return {t: {"fwd": f, "bwd": b, "fwd_bwd": f + b} for t, (f, b) in fwd_bwd.items()}


def time_case(case: Case, timer: Timer) -> dict[str, list[float]]:
    leaves = list(case.leaves.values())

    def backward(outs):
        torch.autograd.backward(outs, case.grad_outs)

    return {
        "fwd": timer.samples_ms(case.fwd, leaves=leaves),
        "bwd": timer.samples_ms(backward, prepare=case.fwd, leaves=leaves),
        "fwd_bwd": timer.samples_ms(lambda: backward(case.fwd()), leaves=leaves),
    }


def run_once(case: Case, device: torch.device) -> tuple[dict, dict, float]:
    """One forward + backward: ``(outputs, leaf grads, wall seconds)``."""
    for t in case.leaves.values():
        t.grad = None
    t0 = time.perf_counter()
    outs = case.fwd()
    torch.autograd.backward(outs, case.grad_outs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    grads = {f"grad_{k}": t.grad for k, t in case.leaves.items()}
    return dict(zip(case.out_names, (o.detach() for o in outs), strict=True)), grads, seconds


def compare(got: dict, ref: dict) -> dict:
    """``max_abs = max|got - ref|`` and ``max_rel = max_abs / max|ref|`` per tensor."""
    report, missing = {}, [k for k in ref if got.get(k) is None]
    for key in (k for k in ref if k not in missing):
        max_abs = (got[key].float() - ref[key].float()).abs().max().item()
        scale = max(ref[key].abs().max().item(), 1e-30)
        report[key] = {"max_abs": max_abs, "max_rel": max_abs / scale}
    # A NaN anywhere makes worst_rel NaN (max keeps a leading NaN; the check reads NaN as wrong).
    rels = [v["max_rel"] for v in report.values()]
    report["worst_rel"] = math.nan if any(map(math.isnan, rels)) else max(rels, default=0.0)
    return report | ({"missing": missing} if missing else {})


def ratios(timings: dict, floor_ms: dict) -> dict:
    """Every ratio of ``PAIRS`` per target and mode, and ``site/residual`` per implementation;
    a ratio whose two numbers were not both measured is left out."""

    def table(a: str, b: str, rows: dict) -> dict:  # rows: row name -> (target of a, of b)
        ta = floor_ms if a == "floor" else timings.get(a, {})
        tb = floor_ms if b == "floor" else timings.get(b, {})
        out = {}
        for row, (target_a, target_b) in rows.items():
            va, vb = ta.get(target_a, {}), tb.get(target_b, {})
            if cells := {m: va[m] / vb[m] for m in MODES if m in va and vb.get(m)}:
                out[row] = cells
        return out

    out = {f"{a}/{b}": table(a, b, {t: (t, t) for t in TARGETS}) for a, b in PAIRS}
    out["site/residual"] = {}
    for impl in ("ours", "eager", "compile", "liger"):
        out["site/residual"] |= table(impl, "residual", {impl: ("site", "site")})
    # Two sites in a row against twice one site: below 1 where the row is cheaper (ours: the
    # chained backward).
    out["row/(2*site)"] = {
        impl: {m: t["row"][m] / (2 * t["site"][m]) for m in MODES if t["site"].get(m)}
        for impl, t in timings.items() if "row" in t and "site" in t
    }  # fmt: skip
    return {k: v for k, v in out.items() if v}


def _runs(name: str, target: str) -> bool:
    """The ``row`` target (two sites in a row) is ours alone: the others only repeat their
    site, and the device check's time is short."""
    return target != "row" or name == "ours"


def bench_shape(impls: dict, args, C: int, device: torch.device, gbps: float, timer: Timer) -> dict:
    """Checks, then times, every implementation at one width ``C``."""
    n, T, tol = args.streams, args.tokens, TOLERANCE[args.dtype]
    torch._dynamo.reset()  # fresh static-shape graphs: first_call_s is a full compile per shape
    d = make_data(n, C, T, DTYPES[args.dtype], device)
    fb = floor_bytes(n, T, C, d["x"].element_size())
    res = {"n": n, "C": C, "T": T, "dtype": args.dtype, "floor_bytes": fb}
    res["floor_ms"] = {t: {m: b / gbps / 1e6 for m, b in v.items()} for t, v in fb.items()}
    for key in ("timings_ms", "timings_min_ms", "first_call_s", "correctness", "errors"):
        res[key] = {}
    eager, failed = load_impl("eager", device), set()
    for target in TARGETS:  # correctness before timing: a fast but wrong kernel shows up
        ref_outs, ref_grads, _ = run_once(make_case("eager", eager, target, d), device)
        for name, impl in impls.items():
            if name in ("eager", "residual") or not _runs(name, target):
                continue
            try:
                outs, grads, seconds = run_once(make_case(name, impl, target, d), device)
            except Exception as e:  # recorded, not fatal: the other implementations still run
                res["errors"].setdefault(name, {})[target] = f"{type(e).__name__}: {e}"
                failed.add((name, target))
                continue
            res["first_call_s"].setdefault(name, {})[target] = seconds
            report = compare(outs | grads, ref_outs | ref_grads)
            res["correctness"].setdefault(name, {})[target] = report
            if "missing" in report or not report["worst_rel"] <= tol:
                print(f"WARNING {name}:{target} C={C} differs from eager: {report}")
        del ref_outs, ref_grads
    res["compile_time_s"] = res["first_call_s"].get("compile", {})
    for name, impl in impls.items():
        for target in ("site",) if name == "residual" else TARGETS:
            if (name, target) in failed or not _runs(name, target):
                continue
            try:
                samples = time_case(make_case(name, impl, target, d), timer)
            except Exception as e:
                res["errors"].setdefault(name, {})[target] = f"{type(e).__name__}: {e}"
                continue
            for key, pick in (("timings_ms", statistics.median), ("timings_min_ms", min)):
                res[key].setdefault(name, {})[target] = {m: pick(s) for m, s in samples.items()}
    res["ratios"] = ratios(res["timings_ms"], res["floor_ms"])
    return res


def print_tables(res: dict) -> None:
    print(f"\n== n={res['n']} C={res['C']} T={res['T']} {res['dtype']} ==")
    print(f"{'ms, then ratios':<30}" + "".join(f"{m:>10}" for m in MODES))
    rows = [(f"{i}:{t}", v) for i, ts in res["timings_ms"].items() for t, v in ts.items()]
    rows += [(f"floor:{t}", v) for t, v in res["floor_ms"].items()]
    rows += [(f"{k} {t}", v) for k, ts in res["ratios"].items() for t, v in ts.items()]
    for label, values in rows:
        print(f"{label:<30}" + "".join(f"{values.get(m, math.nan):>10.4g}" for m in MODES))
    for name, errors in res["errors"].items():
        for target, message in errors.items():
            print(f"error {name}:{target}: {message[:300]}")


def meta(args, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    return device_meta(device, ("torch", "triton", "liger-kernel")) | {
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "sinkhorn_iters": ITERS,
        "eps": EPS,
        "method": METHOD,
        "warning_tolerance_worst_rel": TOLERANCE[args.dtype],
        "note": None if cuda else "CPU: a smoke test of the harness, not a performance number",
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--streams", type=int, default=4, help="n (default 4)")
    p.add_argument("--hidden", type=int, nargs="+", help="C values (GPU 1280 2560 4096; CPU 32)")
    p.add_argument("--tokens", type=int, help="T (GPU 16384; CPU 64)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="stream dtype")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated (default: all)")
    p.add_argument("--iters", type=int, help="timed reps (GPU 50; CPU 3)")
    p.add_argument("--warmup", type=int, help="untimed reps before them (GPU 10; CPU 1)")
    p.add_argument("--out", type=Path, help="JSON (benchmarks/results/mhc_site_<device>.json)")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    args.hidden = args.hidden or ([1280, 2560, 4096] if gpu else [32])
    args.tokens = args.tokens or (16384 if gpu else 64)
    args.iters = args.iters or (50 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    args.impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if unknown := set(args.impls) - set(IMPLS):
        p.error(f"unknown --impls {sorted(unknown)}; choose from {', '.join(IMPLS)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark, writes the JSON, prints the tables; returns the JSON's content."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        # Triton reads this when a kernel is defined, so it is set before the kernels are imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: use --device cpu for a smoke run")
    impls, status = {}, {}
    for name in args.impls:
        try:
            impls[name] = load_impl(name, device)
            status[name] = {"available": True}
        except Exception as e:  # package missing, CPU-only machine, kernels not written yet
            status[name] = {"available": False, "reason": f"unavailable: {type(e).__name__}: {e}"}
            print(f"{name}: {status[name]['reason']}")
    timer = Timer(device, args.iters, args.warmup, flush=True)
    result = {"meta": meta(args, device), "bandwidth": copy_bandwidth(device, timer)}
    result |= {"floor_definition": FLOOR_DEFINITION, "impls": status, "shapes": []}
    print(f"{result['meta']['device_name']}: copy {result['bandwidth']['GBps']:.0f} GB/s")
    for C in args.hidden:
        gbps = result["bandwidth"]["GBps"]
        result["shapes"].append(bench_shape(impls, args, C, device, gbps, timer))
        print_tables(result["shapes"][-1])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_result(result, args.out, "mhc_site")
    return result


if __name__ == "__main__":
    main()
