"""Layer and decoder-block specs of mHC GPT models (local and TransformerEngine flavours)."""

import copy
from functools import partial

from megatron.core.extensions.transformer_engine import HAVE_TE
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from mhc_megatron.megatron.attention import use_local_mla_core_attention
from mhc_megatron.megatron.config import MHCConfigError, MHCTransformerConfig
from mhc_megatron.megatron.experts import use_grouped_gemm_experts
from mhc_megatron.megatron.layer import MHCTransformerLayer, get_bias_dropout
from mhc_megatron.megatron.streams import CollapseStreamsNorm


def use_transformer_engine(config: MHCTransformerConfig) -> bool:
    """Whether to build TE modules.

    ``--transformer-impl transformer_engine`` (Megatron's default) needs TransformerEngine
    importable; without it the error says to pass ``local``.
    """
    if config.transformer_impl != "transformer_engine":
        return False
    if not HAVE_TE:
        raise MHCConfigError(
            "--transformer-impl transformer_engine (Megatron's default) needs TransformerEngine, "
            "which is not importable here; pass --transformer-impl local"
        )
    return True


def to_mhc_layer_spec(layer_spec: ModuleSpec) -> ModuleSpec:
    """A stock GPT layer spec turned into its mHC version.

    The layer class becomes MHCTransformerLayer and the two bias-dropout-add slots stop adding
    the residual. The spec is copied: Megatron shares one spec object among layers and mutates
    it while building.
    """
    spec = copy.deepcopy(layer_spec)
    spec.module = MHCTransformerLayer
    spec.submodules.self_attn_bda = get_bias_dropout
    spec.submodules.mlp_bda = get_bias_dropout
    return spec


def get_mhc_decoder_block_spec(
    config: MHCTransformerConfig, vp_stage: int | None = None, pp_rank: int | None = None
) -> TransformerBlockSubmodules:
    """The decoder block spec of a GPT model with the config's residual variant.

    Dense and MoE layers follow ``config.moe_layer_freq`` (e.g. ``[0]*1 + [1]*11`` for one
    leading dense layer), sliced for this pipeline stage, exactly as Megatron's
    ``get_gpt_decoder_block_spec``; for hc/mhc each layer becomes an MHCTransformerLayer and
    the final norm collapses the streams first.

    Args:
        config: the model's MHCTransformerConfig.
        vp_stage: virtual pipeline stage.
        pp_rank: pipeline rank (default: this rank).

    Returns:
        TransformerBlockSubmodules(layer_specs, layer_norm).
    """
    use_te = use_transformer_engine(config)
    block = get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=use_te,
        normalization=config.normalization,
        qk_l2_norm=config.qk_l2_norm,
        vp_stage=vp_stage,
        pp_rank=pp_rank,
    )
    if config.multi_latent_attention and not use_te:
        # The local spec's core attention cannot take MLA's head dims (attention.py).
        block.layer_specs = [copy.deepcopy(spec) for spec in block.layer_specs]
        for spec in block.layer_specs:
            use_local_mla_core_attention(spec)
    if config.moe_grouped_gemm and not use_te:
        # Megatron's local spec runs SequentialMLP even with --moe-grouped-gemm (experts.py).
        block.layer_specs = [copy.deepcopy(spec) for spec in block.layer_specs]
        for spec in block.layer_specs:
            use_grouped_gemm_experts(spec)
    if not config.mhc_enabled:
        return block
    return TransformerBlockSubmodules(
        layer_specs=[to_mhc_layer_spec(spec) for spec in block.layer_specs],
        layer_norm=partial(CollapseStreamsNorm, norm_cls=block.layer_norm),
    )
