"""The model a checkpoint holds against this run's: the settings that define it, the vocabulary.

:func:`model_differences` / :func:`adopt_checkpoint_vocab`: the settings that define the model
(:data:`MODEL_SETTINGS`) must equal the checkpoint's; a layout change (TP, PP, VPP, EP, DP,
recompute, backend) is not one of them. Megatron pads the vocabulary to a multiple of
``make_vocab_size_divisible_by * TP``, so a TP change would otherwise load a 384-row embedding
into 512 rows without a word; the checkpoint's padded size is kept when the new TP divides it.
:func:`describe_differences` writes the refusal, with what to pass for each setting.
"""

from __future__ import annotations

import argparse

from mhc_megatron.training.checkpoint_checks import CheckpointInfo

# Settings that define the model a checkpoint holds (args attribute names). Anything else
# (parallel layout, recompute, backend, precision, optimizer, data, logging) may change on
# resume.
MODEL_SETTINGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
    "group_query_attention", "kv_channels", "multi_latent_attention", "q_lora_rank",
    "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "normalization",
    "norm_epsilon", "swiglu", "squared_relu", "add_bias_linear", "add_qkv_bias", "qk_layernorm",
    "position_embedding_type", "rotary_base", "rotary_percent",
    "untie_embeddings_and_output_weights", "num_experts", "moe_router_topk",
    "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_layer_freq",
    "moe_router_score_function", "moe_router_enable_expert_bias", "mtp_num_layers",
    "tokenizer_type", "tokenizer_model", "vocab_size", "padded_vocab_size", "mhc_variant",
    "mhc_num_streams", "mhc_collapse", "mhc_sinkhorn_iters", "mhc_eps",
)  # fmt: skip
# Only meaningful for one setting of another; compared only then.
_ONLY_WITH = {
    "max_position_embeddings": ("position_embedding_type", "learned_absolute"),
    # Megatron fills it in after validation when GQA is off (1 at parse time, heads later).
    "num_query_groups": ("group_query_attention", True),
}
_MHC_ONLY = {"mhc_num_streams", "mhc_collapse", "mhc_sinkhorn_iters", "mhc_eps"}


def _normalized(value):
    if isinstance(value, tuple):
        return list(value)
    return value


def model_differences(ckpt_args, args) -> list[tuple[str, object, object]]:
    """``[(setting, checkpoint value, this run's value)]`` over :data:`MODEL_SETTINGS`.

    Settings missing from either side (older checkpoints) are not compared; a checkpoint without
    ``mhc_variant`` is a plain residual model. The mHC settings are compared only when either
    side is an mHC model.
    """
    differences = []
    variants = (getattr(ckpt_args, "mhc_variant", "residual"), getattr(args, "mhc_variant", None))
    both_residual = all(v in (None, "residual") for v in variants)
    names = list(MODEL_SETTINGS) + list(_ONLY_WITH)
    for name in names:
        if name in _MHC_ONLY and both_residual:
            continue
        if name in _ONLY_WITH:
            other, value = _ONLY_WITH[name]
            if value not in (getattr(args, other, None), getattr(ckpt_args, other, None)):
                continue
        if name == "mhc_variant":
            theirs = variants[0]
        elif hasattr(ckpt_args, name):
            theirs = getattr(ckpt_args, name)
        else:
            continue
        if not hasattr(args, name):
            continue
        ours = getattr(args, name)
        if _normalized(theirs) != _normalized(ours):
            differences.append((name, theirs, ours))
    return differences


def _flag_hint(name: str, value, actions: dict[str, argparse.Action]) -> str:
    """What to pass to get ``value`` for setting ``name`` (from the argument parser)."""
    action = actions.get(name)
    if name == "padded_vocab_size":
        return "(derived from --vocab-size, --make-vocab-size-divisible-by and TP)"
    if action is None:
        return ""
    flag = max(action.option_strings, key=len)
    if isinstance(action, argparse._StoreTrueAction):
        return f"pass {flag}" if value else f"drop {flag}"
    if isinstance(action, argparse._StoreFalseAction):
        return f"drop {flag}" if value else f"pass {flag}"
    if value is None:
        return f"drop {flag}"
    if isinstance(value, list | tuple):
        if name == "moe_layer_freq":
            return f'pass {flag} "[{",".join(map(str, value))}]"'
        return f"pass {flag} {' '.join(map(str, value))}"
    return f"pass {flag} {value}"


def parser_actions() -> dict[str, argparse.Action]:
    """``{dest: action}`` of pretrain_mhc.py's arguments (Megatron's plus ``--mhc-*``)."""
    from megatron.training.arguments import add_megatron_arguments

    from mhc_megatron.training.arguments import add_mhc_args

    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_mhc_args(add_megatron_arguments(parser))
    actions = {}
    for action in parser._actions:
        # Prefer the positive flag for settings with both (e.g. --bias-linear/--disable-...).
        actions.setdefault(action.dest, action)
    return actions


def adopt_checkpoint_vocab(ckpt_args, args) -> str | None:
    """Keeps the checkpoint's padded vocabulary when this run's TP divides it.

    Megatron pads ``--vocab-size`` to a multiple of ``make_vocab_size_divisible_by * TP``, so
    the same model gets another embedding size at another TP. With the checkpoint's size the TP
    change continues the run exactly as a PP change does.

    Returns:
        A line for the log when ``args.padded_vocab_size`` was changed, else None. Leaves the
        arguments alone when the vocabulary itself differs or TP does not divide the size
        (:func:`model_differences` then reports it).
    """
    theirs = getattr(ckpt_args, "padded_vocab_size", None)
    ours = getattr(args, "padded_vocab_size", None)
    if theirs is None or ours is None or theirs == ours:
        return None
    if getattr(ckpt_args, "vocab_size", None) != getattr(args, "vocab_size", None):
        return None
    if getattr(ckpt_args, "tokenizer_type", None) != getattr(args, "tokenizer_type", None):
        return None
    if theirs % args.tensor_model_parallel_size != 0:
        return None
    args.padded_vocab_size = theirs
    return (
        f"> padded vocabulary: {theirs} rows from the checkpoint (this layout alone would pad to "
        f"{ours}; TP {args.tensor_model_parallel_size} divides {theirs})"
    )


def describe_differences(info: CheckpointInfo, differences, args, actions) -> str:
    """The refusal message: each differing setting, both values and what to pass."""
    lines = [
        f"the checkpoint in {info.load_dir} (iteration {info.iteration}) holds a different model "
        "than this run:"
    ]
    for name, theirs, ours in differences:
        hint = _flag_hint(name, theirs, actions)
        lines.append(f"  {name}: checkpoint {theirs!r}, this run {ours!r}  {hint}".rstrip())
        if name == "padded_vocab_size" and theirs % args.tensor_model_parallel_size:
            divisors = [d for d in range(1, 65) if theirs % d == 0]
            lines.append(
                f"    the checkpoint's {theirs} embedding rows cannot be split over TP "
                f"{args.tensor_model_parallel_size}: use a --tensor-model-parallel-size that "
                f"divides it ({', '.join(map(str, divisors))}); a new run that should resume at "
                f"any TP up to 8 can pass --make-vocab-size-divisible-by 1024"
            )
    lines.append(
        "A layout change (TP, PP, VPP, EP, DP, recompute, backend) resumes the same model; these "
        "settings define it. Pass the checkpoint's values, point --load/--save elsewhere for a "
        "new run, or pass --allow-checkpoint-model-change to load these weights into this model "
        "anyway (fine-tuning; usually with --finetune)."
    )
    return "\n".join(lines)
