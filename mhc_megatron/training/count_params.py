"""Count a model's total and active parameters by building it on the meta device (no memory).

The model is built exactly as ``pretrain_mhc.py`` builds it (Megatron's argument parser, the mHC
config, ``MHCGPTModelBuilder``), as one rank holding every layer; only the tensors are
placeholders. A 27B model takes a few seconds on a laptop.

Active parameters follow the paper's Table 5 convention: everything a token passes through
except the input embedding (a lookup, not a matmul), with the routed experts counted at
``topk / num_experts`` of their total. The output layer counts.

Examples:
    python tools/count_params.py --recipe 27b
    VARIANT=residual python tools/count_params.py --recipe 3b --json
    python tools/count_params.py -- --num-layers 4 --hidden-size 128 ...  (pretrain_mhc.py args)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: the recipes live in examples/
RECIPES = ROOT / "examples" / "recipes"
# Built on one CPU rank with the local modules: TransformerEngine's modules hold the same
# parameters (a fused layer-norm weight instead of a separate norm module).
SINGLE_RANK_FLAGS = [
    "--use-cpu-initialization", "--micro-batch-size", "1", "--train-iters", "1", "--mock-data",
]  # fmt: skip


def recipe_args(recipe: str, variant: str | None = None) -> list[str]:
    """MODEL_ARGS of ``examples/recipes/<recipe>.sh``, with a NullTokenizer of its vocab size.

    The recipe is sourced by bash, so the arguments are exactly what ``run.sh`` passes.
    """
    path = RECIPES / f"{recipe}.sh"
    if not path.is_file() or recipe in ("common", "run"):
        known = sorted(p.stem for p in RECIPES.glob("*.sh") if p.stem not in ("common", "run"))
        raise SystemExit(f"error: no recipe {recipe!r} in {RECIPES}; known: {', '.join(known)}")
    env = dict(os.environ)
    if variant is not None:
        env["VARIANT"] = variant
    script = f'source "{path}" && printf "%s\\0" "${{MODEL_ARGS[@]}}" "$VOCAB_SIZE"'
    out = subprocess.run(
        ["bash", "-c", script], env=env, check=True, capture_output=True, text=True
    ).stdout
    *model_args, vocab_size = out.split("\0")[:-1]
    return [*model_args, "--tokenizer-type", "NullTokenizer", "--vocab-size", vocab_size]


def build_meta_model(pretrain_args: list[str]):
    """Builds the whole model (one stage) on the meta device from pretrain_mhc.py arguments.

    Returns:
        (model, parsed args).
    """
    from mhc_megatron.processes import init_single_rank
    from mhc_megatron.training.cpu import CPU_FLAGS, enable_cpu_mode

    enable_cpu_mode()  # before Megatron's import: its CUDA calls land on CPU
    import torch
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron.training.arguments import parse_args, validate_args

    from mhc_megatron.megatron.model import MHCGPTModelBuilder, MHCGPTModelConfig
    from mhc_megatron.training.arguments import add_mhc_args, mhc_transformer_config_from_args

    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    argv, sys.argv = sys.argv, [sys.argv[0], *pretrain_args, *CPU_FLAGS, *SINGLE_RANK_FLAGS]
    try:
        # Not parse_and_validate_args: it also sets Megatron's global args, once per process.
        args = parse_args(extra_args_provider=add_mhc_args)
    finally:
        sys.argv = argv
    validate_args(args)
    init_single_rank()
    config = mhc_transformer_config_from_args(args)
    config.perform_initialization = False  # meta tensors hold no values to initialize
    model_cfg = gpt_config_from_args(args, config=config, model_config_cls=MHCGPTModelConfig)
    pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    with torch.device("meta"):
        model = MHCGPTModelBuilder(model_cfg).build_model(pg_collection, True, True)
    return model, args


def count_parameters(model, topk: int | None, num_experts: int | None) -> dict[str, int]:
    """Parameter counts by kind, and the total and active counts (module docstring).

    Args:
        model: a whole GPTModel (every layer on this rank).
        topk: routed experts per token (None for a dense model).
        num_experts: routed experts per MoE layer.

    Returns:
        {"embedding", "output_layer", "routed_experts", "mhc", "other", "total", "active"}.
    """
    counts = dict.fromkeys(("embedding", "output_layer", "routed_experts", "mhc", "other"), 0)
    for name, param in model.named_parameters():
        if name.startswith("embedding."):
            kind = "embedding"
        elif name.startswith("output_layer."):
            kind = "output_layer"
        elif ".mlp.experts." in name:  # shared experts live in .mlp.shared_experts.
            kind = "routed_experts"
        elif "_hyper_connection." in name or name.rsplit(".", 1)[-1].startswith("head_"):
            kind = "mhc"
        else:
            kind = "other"
        counts[kind] += param.numel()
    counts["total"] = sum(counts.values())
    routed_share = topk / num_experts if num_experts else 0.0
    counts["active"] = round(
        counts["total"] - counts["embedding"] - counts["routed_experts"] * (1 - routed_share)
    )
    return counts


def main(argv: list[str] | None = None) -> dict[str, int]:
    """Prints the counts of a recipe or of pretrain_mhc.py arguments; returns them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", help="a recipe under examples/recipes (tiny, 3b, 9b, 27b)")
    parser.add_argument(
        "--variant", choices=("mhc", "mhc-lite", "hc", "residual"), default=None,
        help="override the recipe's variant (default: $VARIANT or mhc)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("pretrain_args", nargs=argparse.REMAINDER,
                        help="after --: pretrain_mhc.py model arguments")  # fmt: skip
    opts = parser.parse_args(argv)
    extra = opts.pretrain_args[1:] if opts.pretrain_args[:1] == ["--"] else opts.pretrain_args
    if not opts.recipe and not extra:
        parser.error("give --recipe NAME or pretrain_mhc.py arguments after --")
    pretrain_args = (recipe_args(opts.recipe, opts.variant) if opts.recipe else []) + extra
    model, args = build_meta_model(pretrain_args)
    counts = count_parameters(model, args.moe_router_topk, args.num_experts)
    if opts.json:
        print(json.dumps(counts))
    else:
        for kind, value in counts.items():
            print(f"{kind:>15}: {value:>15,d}  ({value / 1e9:.3f}B)")
    return counts
