"""Activation memory and step time of mHC's stream recompute (``--mhc-recompute``), in one run.

Three configurations of one MoE GPT (a leading dense layer, then MoE layers): ``residual`` (the
plain pre-norm baseline), ``mhc`` (n streams, no recompute) and ``mhc_recompute`` (one recompute
block per stage, the default of a bare ``--mhc-recompute``). For each:

- ``saved_bytes``: bytes held for backward after one forward, counted with saved-tensor hooks
  (``mhc_megatron.megatron.recompute.saved_activation_bytes``); exact on any device.
- ``step_ms``: median forward + backward time over ``--iters`` steps (CUDA events on a GPU,
  ``time.perf_counter`` on CPU, where the numbers say little about a GPU).
- ``peak_mib``: peak allocated memory of a step (CUDA only).

Ratios written to the JSON: saved bytes and peak memory against ``residual``, step time of
``mhc_recompute`` against ``mhc``. Goal: ``mhc_recompute`` at most 1.3x the residual's bytes, for
at most 10% more step time than ``mhc``.

Usage::

    python benchmarks/bench_recompute.py --device cpu      # saved bytes; CPU timings
    python benchmarks/bench_recompute.py --device cuda     # plus peak memory, GPU timings
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # runs from a plain checkout: the GPU machine has no install

from benchmarks.harness import init_single_rank, write_json  # noqa: E402

CONFIGS = {
    "residual": dict(mhc_variant="residual"),
    "mhc": dict(mhc_variant="mhc"),
    "mhc_recompute": dict(mhc_variant="mhc", mhc_recompute="stage"),
}


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=None, help="default: 1024 (cuda), 128 (cpu)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=None, help="default: 4096 (cuda), 128 (cpu)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--iters", type=int, default=None, help="default: 20 (cuda), 3 (cpu)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.hidden = args.hidden or (1024 if gpu else 128)
    args.seq = args.seq or (4096 if gpu else 128)
    args.iters = args.iters or (20 if gpu else 3)
    return args


def _build(args, **mhc):
    from mhc_megatron.megatron import MHCTransformerConfig, build_mhc_gpt_model
    from mhc_megatron.training.cpu_settings import CPU_CONFIG

    gpu = args.device == "cuda"
    config = MHCTransformerConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        ffn_hidden_size=4 * args.hidden,
        num_moe_experts=args.experts,
        moe_router_topk=args.topk,
        moe_ffn_hidden_size=args.hidden,
        moe_layer_freq=[0] + [1] * (args.layers - 1),
        moe_token_dispatcher_type="alltoall",
        mhc_num_streams=args.streams,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        **CPU_CONFIG,  # local modules, no fusions: also all a GPU without TE or apex runs
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=gpu,
        params_dtype=torch.bfloat16 if gpu else torch.float32,
        use_cpu_initialization=not gpu,
        **mhc,
    )
    model = build_mhc_gpt_model(
        config, vocab_size=32000 if gpu else 256, max_sequence_length=args.seq,
        position_embedding_type="rope",
    )  # fmt: skip
    return model.to(args.device).train()


def _measure(args, model) -> dict:
    from mhc_megatron.megatron.recompute import saved_activation_bytes

    vocab = model.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(args.device)
    pos = torch.arange(args.seq, device=args.device).expand(args.batch, -1)
    labels = torch.roll(ids, -1, dims=1)

    def forward():
        return model(ids, pos, None, labels=labels).float().mean()

    saved = saved_activation_bytes(model, forward)
    gpu = args.device == "cuda"
    times, peak = [], None
    for i in range(args.iters + 1):  # the first step warms up (allocator, kernel compilation)
        model.zero_grad(set_to_none=True)
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        forward().backward()
        if gpu:
            torch.cuda.synchronize()
        if i:
            times.append((time.perf_counter() - start) * 1e3)
    if gpu:
        peak = torch.cuda.max_memory_allocated() / 2**20
    return {"saved_bytes": saved, "step_ms": statistics.median(times), "peak_mib": peak}


def main() -> None:
    args = _parse()
    init_single_rank(args.device)
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(1234)
    results = {name: _measure(args, _build(args, **extra)) for name, extra in CONFIGS.items()}
    base, mhc, recompute = results["residual"], results["mhc"], results["mhc_recompute"]
    ratios = {
        "saved_bytes mhc/residual": mhc["saved_bytes"] / base["saved_bytes"],
        "saved_bytes mhc_recompute/residual": recompute["saved_bytes"] / base["saved_bytes"],
        "step_ms mhc_recompute/mhc": recompute["step_ms"] / mhc["step_ms"],
        "step_ms mhc/residual": mhc["step_ms"] / base["step_ms"],
    }
    if args.device == "cuda":
        ratios["peak_mib mhc/residual"] = mhc["peak_mib"] / base["peak_mib"]
        ratios["peak_mib mhc_recompute/residual"] = recompute["peak_mib"] / base["peak_mib"]
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor()
    report = {
        "device": device or "cpu",
        "torch": torch.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": results,
        "ratios": ratios,
        "goal": "saved_bytes mhc_recompute/residual <= 1.3; step_ms mhc_recompute/mhc <= 1.10",
    }
    out = args.out or Path(__file__).parent / "results" / f"recompute_{args.device}.json"
    write_json(out, report)
    for name, value in ratios.items():
        print(f"{name:40s} {value:7.3f}")
    for name, r in results.items():
        print(f"{name:14s} saved {r['saved_bytes'] / 2**20:9.2f} MiB  step {r['step_ms']:9.1f} ms")
    print(f"written to {out}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
