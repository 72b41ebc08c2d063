"""Whole training steps through Megatron: residual baseline vs mHC (torch and triton backends).

MoE model with the paper's 27B layer shape (hidden 2560, 32 heads, 72 routed experts, 6 active,
2 shared, expert FFN 1536, sequence 4096), standard attention (Megatron's local spec has no MLA
path we can use without TransformerEngine), bf16, one GPU. Reports step time and peak memory
ratios, and mHC's share of the step the model would take at 40% MFU: the fused sites' measured
time per step over ``6 * active_params * tokens / (0.4 * bf16 GEMM rate measured in this run)``.
``benchmarks/README.md`` describes the JSON.

    python benchmarks/bench_step.py                  # H100: 4 layers, 4096 tokens per step
    python benchmarks/bench_step.py --device cpu     # smoke run: CPU numbers mean nothing
"""

import argparse
import gc
import math
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # runs from a plain checkout: the GPU machine has no install

from benchmarks.harness import Timer, copy_bandwidth, device_meta, init_single_rank, write_result  # noqa: E402

CONFIGS = {
    "residual": dict(mhc_variant="residual"),
    "mhc_torch": dict(mhc_variant="mhc", mhc_backend="torch"),
    "mhc_triton": dict(mhc_variant="mhc", mhc_backend="triton"),
}
MFU, GOAL_SHARE, SINKHORN_ITERS, EPS = 0.4, 0.067, 20, 1e-6
# GPU: the paper's 27B layer shape. CPU: tiny, only to exercise the harness.
PRESETS = {
    "cuda": dict(layers=4, hidden=2560, heads=32, experts=72, topk=6, shared=2, moe_ffn=1536,
                 seq=4096, batch=1, vocab=129280, iters=10, warmup=3, site_iters=50, gemm=8192),
    "cpu": dict(layers=2, hidden=64, heads=4, experts=8, topk=2, shared=2, moe_ffn=32,
                seq=32, batch=2, vocab=128, iters=2, warmup=1, site_iters=2, gemm=256),
}  # fmt: skip
ACTIVE_METHOD = (
    "parameters a token passes through in a GEMM, counted on the built residual model: "
    "attention (QKV, proj), dense-layer MLP, router, shared experts, norms (negligible), and "
    "the routed experts times topk/num_experts (every token uses topk of num_experts equal "
    "experts). The input embedding is excluded (a lookup, no GEMM); mHC parameters are excluded "
    "(their cost is what is measured). decoder = the layers only: the deep-model limit, where the "
    "output layer is a few percent of the compute (the 27B model has tens of layers); model = "
    "decoder + output layer (a few layers and a 129k vocabulary make the output layer large)."
)

STEP = {
    "adamw": "forward + backward + AdamW step (fused on CUDA), then grads set to None",
    "none": "forward + backward, then grads set to None (no optimizer)",
}
TIMING = (
    "CUDA events around each step, read after one synchronize (CPU: perf_counter); median of "
    "--iters steps after --warmup; peak = torch.cuda.max_memory_allocated, reset per config"
)
SITE_METHOD = (
    "one site: coefficients + pre + post_res forward+backward (branch = identity) on the model's "
    "x [s, b, n, C] bf16, fn/base/scale fp32, L2 flushed before each rep, median of --site-iters; "
    "2 sites per layer; the final collapse head is not counted. Floor: (6n+5)*T*C*2 bytes per "
    "site / copy bandwidth"
)

MODEL_KEYS = ("layers", "dense_layers", "dense_ffn", "hidden", "heads", "experts", "topk")
MODEL_KEYS += ("shared", "moe_ffn", "seq", "batch", "vocab", "streams")
MODEL_NOTES = {
    "spec": "local (no TransformerEngine), bf16 params (mHC parameters fp32), rope, RMSNorm, "
    "swiglu, no biases, no dropout, alltoall dispatcher, expert/tensor/pipeline parallel 1",
    "attention": "standard multi-head (local DotProductAttention), not MLA",
    "experts_run": "SequentialMLP: one expert after another (no grouped GEMM without TE)",
    "layers_note": "--layers 4 is what fits by an estimate (~60 GB with AdamW bf16 states at "
    "the default shape); raise it until a config records OutOfMemoryError. One leading dense "
    "layer (FFN (topk + shared) * moe_ffn, the MoE layers' active width) from 4 layers on.",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The CLI; shape options left unset take the ``PRESETS`` of ``--device``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--layers", type=int, help="GPU 4: as many as fit (see README); CPU 2")
    for name in ("hidden", "heads", "experts", "topk", "moe_ffn", "seq", "batch", "vocab"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help="GPU default: the 27B shape")
    p.add_argument("--shared", type=int, help="shared experts, each --moe-ffn wide (2)")
    p.add_argument("--dense-layers", type=int, help="leading dense layers (1 if layers >= 4)")
    p.add_argument("--dense-ffn", type=int, help="dense FFN width ((topk + shared) * moe_ffn)")
    p.add_argument("--streams", type=int, default=4, help="mHC streams n")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset")
    p.add_argument("--optimizer", choices=("adamw", "none"), default="adamw")
    p.add_argument("--iters", type=int, help="timed steps (GPU 10)")
    p.add_argument("--warmup", type=int, help="untimed steps before them (GPU 3)")
    p.add_argument("--site-iters", type=int, help="timed site reps (GPU 50, 10 warm-up)")
    p.add_argument("--gemm", type=int, help="N of the N x N x N GEMM (GPU 8192)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", type=Path, help="JSON (benchmarks/results/step_<device>.json)")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dense_layers is None:
        args.dense_layers = 1 if args.layers >= 4 else 0  # the paper's models lead with one
    args.dense_ffn = args.dense_ffn or (args.topk + args.shared) * args.moe_ffn
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if unknown := set(args.configs) - set(CONFIGS):
        p.error(f"unknown --configs {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    if not 0 <= args.dense_layers < args.layers:
        p.error("--dense-layers must leave at least one MoE layer")
    return args


def layer_freq(args) -> list[int]:
    """Megatron's moe_layer_freq: 0 = dense layer, 1 = MoE layer."""
    return [0] * args.dense_layers + [1] * (args.layers - args.dense_layers)


def gemm_rate(device: torch.device, size: int, timer: Timer) -> dict:
    """bf16 ``[N, N] @ [N, N]`` rate, best of 10: the peak the 40%-MFU step is scaled from."""
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    best = min(timer.samples_ms(lambda: torch.mm(a, b), iters=10, warmup=3))
    tflops = 2 * size**3 / best / 1e9
    return {"N": size, "dtype": "bf16", "best_ms": best, "TFLOPs": tflops, "method": "best of 10"}


def build_model(args, overrides: dict, device: torch.device) -> torch.nn.Module:
    """The local-spec bf16 MoE GPT model; ``overrides`` selects the residual variant."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe.router import MoEAuxLossAutoScaler

    from mhc_megatron.megatron import MHCTransformerConfig, build_mhc_gpt_model
    from mhc_megatron.training.cpu_settings import CPU_CONFIG

    cpu = device.type == "cpu"
    config = MHCTransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        ffn_hidden_size=args.dense_ffn, use_cpu_initialization=cpu,
        # Local modules, no fusions (no TE or apex on the GPU machine either; the compiled
        # swiglu alone is ~25 s of cold start).
        **CPU_CONFIG,
        bf16=True, params_dtype=torch.bfloat16, hidden_dropout=0.0, attention_dropout=0.0,
        add_bias_linear=False, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu,
        num_moe_experts=args.experts, moe_router_topk=args.topk, moe_ffn_hidden_size=args.moe_ffn,
        moe_shared_expert_intermediate_size=args.shared * args.moe_ffn,
        moe_token_dispatcher_type="alltoall",
        moe_layer_freq=layer_freq(args),
        moe_grouped_gemm=True,  # no TE here: GroupedGemmMLP (torch grouped_mm), not a loop
        mhc_num_streams=args.streams, mhc_sinkhorn_iters=SINKHORN_ITERS, mhc_eps=EPS,
        **overrides,
    )  # fmt: skip
    # A second MoE model's backward in one process trips over the scale left by the first.
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    torch.manual_seed(args.seed)
    model_parallel_cuda_manual_seed(args.seed)  # same init for every config
    model = build_mhc_gpt_model(
        config, vocab_size=args.vocab, max_sequence_length=args.seq,
        position_embedding_type="rope", share_embeddings_and_output_weights=False,
    )  # fmt: skip
    return model.to(device).bfloat16().train()  # mHC parameters stay fp32 by design


def count_active(model: torch.nn.Module, topk: int, experts: int) -> dict:
    """Active parameter counts of a residual model (``ACTIVE_METHOD``)."""
    counts = dict.fromkeys(("embedding", "output_layer", "dense", "routed_total"), 0)
    for name, p in model.named_parameters():
        if name.startswith(("embedding.", "output_layer.")):
            counts[name.split(".")[0]] += p.numel()
        elif ".mlp.experts." in name:  # routed; shared experts are .mlp.shared_experts.
            counts["routed_total"] += p.numel()
        else:
            counts["dense"] += p.numel()
    counts["routed_active"] = counts["routed_total"] * topk / experts
    counts["decoder"] = counts["dense"] + counts["routed_active"]
    counts["model"] = counts["decoder"] + counts["output_layer"]
    return counts


def run_config(name: str, args, device: torch.device, timer: Timer, data: tuple) -> dict:
    """Builds one config and times ``--iters`` training steps after ``--warmup``."""
    cuda = device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(args, CONFIGS[name], device)
    res = {"available": True, "params": sum(p.numel() for p in model.parameters())}
    if name == "residual":
        res["active_params"] = count_active(model, args.topk, args.experts)
    params = list(model.parameters())
    opt = None
    if args.optimizer == "adamw":  # fused on CUDA: no foreach temporaries the size of all states
        opt = torch.optim.AdamW(params, lr=1e-5, fused=cuda)
    ids, pos, labels = data
    losses = []

    def step():
        loss = model(ids, pos, None, labels=labels).float().mean()
        loss.backward()
        if opt is not None:
            opt.step()
        for p in params:
            p.grad = None
        losses.append(loss.detach())

    if cuda:
        res["allocated_after_build_bytes"] = torch.cuda.memory_allocated()
    timer.samples_ms(step, iters=0, warmup=args.warmup)  # Triton JIT, optimizer state
    if cuda:
        peak_warm, resident = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    samples = timer.samples_ms(step, iters=args.iters, warmup=0)
    res |= {"step_ms": statistics.median(samples), "step_min_ms": min(samples)}
    res["step_samples_ms"] = samples
    res["loss_first_last"] = [losses[0].item(), losses[-1].item()]
    if cuda:  # resident: weights + optimizer states; above it: activations, grads, temporaries
        res["resident_bytes"] = resident
        res["peak_bytes"] = max(peak_warm, torch.cuda.max_memory_allocated())
        res["step_peak_above_resident_bytes"] = torch.cuda.max_memory_allocated() - resident
    return res


def time_site(ops, args, device: torch.device, timer: Timer) -> dict:
    """One mHC site forward + backward on the model's streams ``x [s, b, n, C]`` bf16.

    coefficients -> pre -> (branch = identity) -> post_res, then backward from a fixed
    ``grad [s, b, n, C]``, the way the layer runs it: with the fused kernels, the fused site
    (``mhc_site_enter`` / ``mhc_site_exit``, one ``dx`` pass); with the torch ops, ``x``
    collects its gradient from all three.
    """
    s, b, n, C = args.seq, args.batch, args.streams, args.hidden
    gen = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.randn(s, b, n, C, generator=gen, device=device).bfloat16().requires_grad_()
    K = n * n + 2 * n
    fn = (0.02 * torch.randn(K, n * C, generator=gen, device=device)).requires_grad_()
    base = torch.zeros(K, device=device, requires_grad=True)  # paper init: static logits 0
    scale = torch.full((3,), 0.01, device=device, requires_grad=True)
    grad = torch.randn(s, b, n, C, generator=gen, device=device).bfloat16()
    leaves = (x, fn, base, scale)

    def rep():
        for t in leaves:
            t.grad = None
        if getattr(ops, "site", None) is not None:
            u, _, h_post, h_res, link = ops.site.mhc_site_enter(
                x, fn, base, scale, SINKHORN_ITERS, EPS
            )
            out = ops.site.mhc_site_exit(x, u, h_post, h_res, link)
        else:
            h_pre, h_post, h_res = ops.mhc_coefficients(x, fn, base, scale, SINKHORN_ITERS, EPS)
            out = ops.mhc_post_res(x, ops.mhc_pre(x, h_pre), h_post, h_res)
        torch.autograd.backward(out, grad)

    warmup = 10 if device.type == "cuda" else 0
    samples = timer.samples_ms(rep, iters=args.site_iters, warmup=warmup, flush=True)
    return {"available": True, "site_ms": statistics.median(samples), "site_min_ms": min(samples)}


def load_site_ops(kind: str):
    """``mhc_coefficients``/``mhc_pre``/``mhc_post_res``: ``triton`` (fused) or ``eager``."""
    if kind == "eager":
        from mhc_megatron import ops

        return ops
    from mhc_megatron.kernels import site

    return argparse.Namespace(site=site)


def summarize(result: dict, args) -> None:
    """Ratios, the 40%-MFU step and mHC's shares of it, from numbers measured in this run."""
    runs, sites = result["configs"], result["sites"]
    ok = {k: v for k, v in runs.items() if v.get("available")}
    ratios = {"step_time": {}, "peak_memory": {}, "step_peak_above_resident": {}}
    for name in ("mhc_torch", "mhc_triton"):
        if name in ok and "residual" in ok:
            fields = ("step_ms", "peak_bytes", "step_peak_above_resident_bytes")
            for key, field in zip(ratios, fields, strict=True):
                if ok[name].get(field) and ok["residual"].get(field):
                    ratios[key][f"{name}/residual"] = ok[name][field] / ok["residual"][field]
    result["ratios"] = ratios
    active = ok.get("residual", {}).pop("active_params", None)
    if active is None:
        return
    if "mhc_torch" in ok or "mhc_triton" in ok:  # the sites' fn/base/scale and collapse head
        mhc = ok.get("mhc_triton", ok.get("mhc_torch"))["params"]
        active["mhc_params_excluded"] = mhc - ok["residual"]["params"]
    rate = result["gemm"]["TFLOPs"] * 1e12 * MFU
    t40 = {k: 6 * active[k] * args.seq * args.batch / rate * 1e3 for k in ("decoder", "model")}
    result["active_params"] = active | {"method": ACTIVE_METHOD}
    result["mfu40_step_ms"] = t40 | {"formula": "6 * active * tokens / (0.4 * gemm TFLOPs)"}
    shares = {}
    per_step = {
        k: sites[k]["site_ms"] * sites["count"] for k in ("fused", "eager") if sites[k]["available"]
    }
    per_step["floor"] = sites["floor_ms_per_site"] * sites["count"]
    for key, ms in per_step.items():
        shares[key] = {"ms_per_step": ms} | {f"vs_{k}": ms / t for k, t in t40.items()}
    result["shares"] = shares
    result["measured_step_overhead"] = {}  # noisy, and understated without grouped experts
    for name in ("mhc_torch", "mhc_triton"):
        if name in ok:
            ms = ok[name]["step_ms"] - ok["residual"]["step_ms"]
            result["measured_step_overhead"][name] = {"ms": ms, "vs_decoder": ms / t40["decoder"]}
    fused = shares.get("fused", {}).get("vs_decoder")
    result["goal"] = {
        "share": "shares.fused.vs_decoder", "max": GOAL_SHARE, "value": fused,
        "met": None if fused is None else fused <= GOAL_SHARE,
    }  # fmt: skip


def print_report(result: dict) -> None:
    """The readable table: steps, memory, ratios, the 40%-MFU step and the shares."""
    ratios, gib = result["ratios"], 2.0**30
    print(f"\n{'config':<12}{'step ms':>10}{'min ms':>10}{'peak GiB':>10}{'step x':>8}{'mem x':>8}")
    for name, r in result["configs"].items():
        if not r.get("available"):
            print(f"{name:<12}{r['reason'][:120]}")
            continue
        base = 1.0 if name == "residual" else math.nan
        step_x = ratios["step_time"].get(f"{name}/residual", base)
        mem_x = ratios["peak_memory"].get(
            f"{name}/residual", base if "peak_bytes" in r else math.nan
        )
        cells = (r["step_ms"], r["step_min_ms"], r.get("peak_bytes", math.nan) / gib)
        print(
            f"{name:<12}" + "".join(f"{v:>10.2f}" for v in cells) + f"{step_x:>8.3f}{mem_x:>8.3f}"
        )
    g, bw = result["gemm"], result["bandwidth"]
    print(f"GEMM {g['TFLOPs']:.1f} TFLOP/s (N={g['N']}), copy {bw['GBps']:.1f} GB/s")
    if "mfu40_step_ms" not in result:
        return
    a, t = result["active_params"], result["mfu40_step_ms"]
    print(f"active params: decoder {a['decoder'] / 1e6:.2f}M, model {a['model'] / 1e6:.2f}M")
    print(f"40%-MFU step: decoder {t['decoder']:.3f} ms, model {t['model']:.3f} ms")
    print(f"{'mHC share':<12}{'ms/step':>10}{'vs decoder':>14}{'vs model':>14}")
    for key, share in result["shares"].items():
        cells = (share["ms_per_step"], share["vs_decoder"], share["vs_model"])
        print(f"{key:<12}{cells[0]:>10.3f}{cells[1]:>14.2%}{cells[2]:>14.2%}")
    for name, o in result["measured_step_overhead"].items():
        print(f"measured {name} - residual: {o['ms']:.2f} ms, {o['vs_decoder']:.2%} of decoder")
    goal = result["goal"]
    print(f"goal {goal['share']} <= {goal['max']:.1%}: {goal['met']}")


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark, writes the JSON, prints the tables; returns the JSON's content."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        # Triton reads it when a kernel is defined: set before the kernels are imported.
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: use --device cpu for a smoke run")
    init_single_rank(device)
    try:
        return run(args, device)
    finally:
        import torch.distributed as dist
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def run(args, device: torch.device) -> dict:
    """Everything after the process group is up (see :func:`main`)."""
    cuda, tokens = device.type == "cuda", args.seq * args.batch
    timer = Timer(device)
    result = {
        "meta": device_meta(device, ("torch", "triton", "megatron-core"))
        | {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "triton_interpret": os.environ.get("TRITON_INTERPRET"),
            "step": STEP[args.optimizer],
            "timing": TIMING,
            "note": None if cuda else "CPU smoke run, Triton interpreted: numbers mean nothing",
        },
        "model": {k: getattr(args, k) for k in MODEL_KEYS}
        | {"tokens": tokens, "moe_layer_freq": layer_freq(args)}
        | MODEL_NOTES,
    }
    result["gemm"] = gemm_rate(device, args.gemm, timer)
    result["bandwidth"] = copy_bandwidth(device, timer, warmup=2)
    gen = torch.Generator().manual_seed(args.seed)  # same tokens for every config
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    data = (ids, torch.arange(args.seq, device=device).expand_as(ids), torch.roll(ids, -1, 1))
    result["configs"] = {}
    for config in args.configs:
        try:
            result["configs"][config] = run_config(config, args, device, timer, data)
        except Exception as e:  # triton kernels failing, OOM: recorded, the others still run
            reason = f"unavailable: {type(e).__name__}: {str(e)[:500]}"
            result["configs"][config] = {"available": False, "reason": reason}
            print(f"{config}: {reason}")
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    floor_bytes = (6 * args.streams + 5) * tokens * args.hidden * 2  # bf16 streams
    sites = {"count": 2 * args.layers, "shape_x": [args.seq, args.batch, args.streams, args.hidden]}
    sites |= {"floor_bytes_per_site": floor_bytes}
    sites["floor_ms_per_site"] = floor_bytes / result["bandwidth"]["GBps"] / 1e6
    sites["method"] = SITE_METHOD
    for key, kind in (("fused", "triton"), ("eager", "eager")):
        try:
            sites[key] = time_site(load_site_ops(kind), args, device, timer)
        except Exception as e:
            sites[key] = {"available": False, "reason": f"unavailable: {type(e).__name__}: {e}"}
    result["sites"] = sites
    summarize(result, args)
    print_report(result)
    write_result(result, args.out, "step")
    return result


if __name__ == "__main__":
    main()
