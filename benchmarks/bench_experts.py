"""MoE experts without TransformerEngine: GroupedGemmMLP (torch's grouped GEMM) against
Megatron's SequentialMLP (one expert at a time), forward and backward, at the paper's expert
shapes, in one run.

Shapes (``examples/recipes``): ``3b`` = 64 experts, hidden 1280, expert FFN 896; ``27b`` = 72
experts, hidden 2560, expert FFN 1536; SwiGLU, top-6, no biases, all experts local (EP 1).
Each of ``--tokens`` tokens goes to 6 distinct experts drawn at random (a balanced router on
average), so the experts see ``6 * tokens`` rows. Both modules hold the same weights; before
timing, outputs and every gradient are compared (``max_rel = max|a - b| / max|b|``).

    python benchmarks/bench_experts.py                       # GPU: bf16, 4096 tokens
    python benchmarks/bench_experts.py --device cpu          # CPU: fp32, 256 tokens
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # runs from a plain checkout

from benchmarks.harness import Timer, device_meta, init_single_rank, write_result  # noqa: E402

SHAPES = {
    "tiny": dict(experts=8, hidden=64, ffn=32),  # the CPU dry run of device_check.sh
    "3b": dict(experts=64, hidden=1280, ffn=896),
    "27b": dict(experts=72, hidden=2560, ffn=1536),
}
TOPK = 6
MODES = ("fwd", "bwd", "fwd_bwd")


def build(shape: dict, dtype: torch.dtype, device: torch.device):
    """``(sequential, grouped)`` experts with the same weights, on ``device``."""
    import torch.nn.functional as F
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mhc_megatron.megatron.experts import GroupedGemmMLP

    model_parallel_cuda_manual_seed(1234)  # the expert-parallel RNG that GPU init draws from

    config = TransformerConfig(
        num_layers=1, hidden_size=shape["hidden"], num_attention_heads=16,
        num_moe_experts=shape["experts"], moe_ffn_hidden_size=shape["ffn"],
        ffn_hidden_size=shape["ffn"], moe_router_topk=TOPK, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, bias_activation_fusion=False,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, transformer_impl="local",
        gradient_accumulation_fusion=False,
        # On a GPU the weights are drawn there: 72 experts at 27B are 850M numbers.
        use_cpu_initialization=device.type == "cpu",
    )  # fmt: skip
    pg = ProcessGroupCollection.use_mpu_process_groups()
    layer = get_gpt_layer_local_submodules(num_experts=shape["experts"]).mlp
    submodules = layer.keywords["submodules"].experts.keywords["submodules"]
    sequential = layer(config=config, pg_collection=pg).experts
    grouped = GroupedGemmMLP(shape["experts"], config, submodules, pg_collection=pg)
    grouped.load_state_dict(sequential.state_dict())
    return sequential, grouped


def make_inputs(shape: dict, tokens: int, dtype, device, seed: int = 0) -> dict:
    """Rows grouped by expert, the per-expert counts, fp32 probs and a fixed output grad."""
    gen = torch.Generator().manual_seed(seed)
    choice = torch.rand(tokens, shape["experts"], generator=gen).argsort(dim=1)[:, :TOPK]
    counts = torch.bincount(choice.flatten(), minlength=shape["experts"])
    rows = TOPK * tokens
    return {
        "x": torch.randn(rows, shape["hidden"], generator=gen).to(dtype).to(device),
        "tokens_per_expert": counts,
        "probs": torch.rand(rows, generator=gen).to(device),
        "grad": torch.randn(rows, shape["hidden"], generator=gen).to(dtype).to(device),
    }


def run_once(experts, d: dict) -> dict:
    from mhc_megatron.megatron.experts import stack_sequential_state

    x = d["x"].detach().requires_grad_()
    probs = d["probs"].detach().requires_grad_()
    for p in experts.parameters():
        p.grad = None
    out, _ = experts(x, d["tokens_per_expert"], probs)
    out.backward(d["grad"])
    grads = {name: p.grad for name, p in experts.named_parameters()}
    # SequentialMLP's per-expert gradients under GroupedGemmMLP's stacked names.
    stack_sequential_state(grads, "", experts.num_local_experts)
    return {"out": out.detach(), "d_x": x.grad, "d_probs": probs.grad, **grads}


def compare(got: dict, want: dict) -> float:
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    worst = 0.0
    for key, ref in want.items():
        diff = (got[key].float() - ref.float()).abs().max().item()
        worst = max(worst, diff / max(ref.abs().max().item(), 1e-30))
    return worst


def time_modes(experts, d: dict, timer: Timer) -> dict:
    x = d["x"].detach().requires_grad_()
    probs = d["probs"].detach().requires_grad_()
    leaves = [x, probs, *experts.parameters()]

    def forward():
        return experts(x, d["tokens_per_expert"], probs)[0]

    samples = {
        "fwd": timer.samples_ms(forward, leaves=leaves),
        "bwd": timer.samples_ms(lambda out: out.backward(d["grad"]), prepare=forward,
                                leaves=leaves),
        "fwd_bwd": timer.samples_ms(lambda: forward().backward(d["grad"]), leaves=leaves),
    }  # fmt: skip
    return {m: statistics.median(s) for m, s in samples.items()}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="3b,27b", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--tokens", type=int, help="tokens before routing (GPU 4096, CPU 256)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="GPU bf16, CPU fp32")
    p.add_argument("--iters", type=int, help="timed reps (GPU 20, CPU 2)")
    p.add_argument("--warmup", type=int, help="untimed reps first (GPU 3, CPU 1)")
    p.add_argument("--out", type=Path, help="JSON (default benchmarks/results/experts_<dev>.json)")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    args.tokens = args.tokens or (4096 if gpu else 256)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.iters = args.iters or (20 if gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        p.error(f"unknown --shapes {unknown}; choose from {', '.join(SHAPES)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    init_single_rank(device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    timer = Timer(device, iters=args.iters, warmup=args.warmup)
    result = {
        "meta": device_meta(device, ["torch", "megatron-core"])
        | {"args": {k: str(v) for k, v in vars(args).items()}, "method": __doc__},
        "shapes": [],
    }
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        sequential, grouped = (m.to(device) for m in build(shape, dtype, device))
        d = make_inputs(shape, args.tokens, dtype, device)
        worst = compare(run_once(grouped, d), run_once(sequential, d))
        timings = {"sequential": time_modes(sequential, d, timer),
                   "grouped": time_modes(grouped, d, timer)}  # fmt: skip
        ratios = {m: timings["grouped"][m] / timings["sequential"][m] for m in MODES}
        row = {"shape": name, **shape, "topk": TOPK, "tokens": args.tokens, "dtype": args.dtype,
               "grouped_path": grouped.grouped(d["x"]), "max_rel": worst,
               "timings_ms": timings, "grouped/sequential": ratios}  # fmt: skip
        result["shapes"].append(row)
        print(f"{name}: grouped/sequential fwd {ratios['fwd']:.3f} bwd {ratios['bwd']:.3f} "
              f"fwd+bwd {ratios['fwd_bwd']:.3f}; max_rel {worst:.1e}")  # fmt: skip
        del sequential, grouped, d
    write_result(result, args.out, "experts")
    return result


if __name__ == "__main__":
    main()
