"""The mHC GPT model's Megatron model config and builder (the model provider).

The model is Megatron's own GPTModel: the n streams live in the decoder spec's modules (the
first layer enters them, the final norm collapses them; see ``streams.py``).
"""

import inspect
import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from megatron.core.models.gpt import GPTModel
from megatron.training.models.gpt import GPTModelBuilder, GPTModelConfig

from mhc_megatron.megatron.config import MHCConfigError, MHCTransformerConfig
from mhc_megatron.megatron.pipeline import stream_shapes_installed
from mhc_megatron.megatron.recompute import optimal_block_layers
from mhc_megatron.megatron.specs import get_mhc_decoder_block_spec

logger = logging.getLogger(__name__)


def mhc_layer_spec(model_config: "MHCGPTModelConfig", vp_stage: int | None = None):
    """``GPTModelConfig.transformer_layer_spec`` callable: the mHC decoder block spec."""
    return get_mhc_decoder_block_spec(model_config.transformer, vp_stage=vp_stage)


@dataclass(kw_only=True)
class MHCGPTModelConfig(GPTModelConfig):
    """GPTModelConfig whose builder is MHCGPTModelBuilder (only the builder differs)."""

    builder: ClassVar[str] = "mhc_megatron.megatron.model.MHCGPTModelBuilder"


class MHCGPTModelBuilder(GPTModelBuilder):
    """Builds the GPTModel stages of an mHC model for Megatron's ``pretrain()``."""

    def build_model(self, pg_collection, pre_process=None, post_process=None, vp_stage=None):
        """Builds one model stage (see GPTModelBuilder.build_model)."""
        transformer = self._model_config.transformer
        if not isinstance(transformer, MHCTransformerConfig):
            raise MHCConfigError(
                "MHCGPTModelBuilder needs an MHCTransformerConfig, got "
                f"{type(transformer).__name__}; build it with "
                "mhc_megatron.megatron.config.to_mhc_config"
            )
        if self._model_config.transformer_layer_spec is None:
            self._model_config.transformer_layer_spec = mhc_layer_spec
        check_pipeline_streams(transformer)
        model = super().build_model(pg_collection, pre_process, post_process, vp_stage)
        if transformer.num_moe_experts:
            mark_expert_parameters(model)
            _log_expert_module(model)
        if transformer.mhc_enabled:
            check_first_stage_has_layers(model)
            if transformer.mhc_recompute_layers is not None:
                _log_recompute_blocks(transformer, len(model.decoder.layers), vp_stage)
        return model


def check_pipeline_streams(config: MHCTransformerConfig) -> None:
    """Refuses an mHC model with pipeline stages when the p2p buffers are not ``[s, b, n*C]``.

    Raises:
        MHCConfigError: pipeline parallelism without the patch (what to call is in the message).
    """
    if config.mhc_enabled and config.pipeline_model_parallel_size > 1:
        if not stream_shapes_installed():
            raise MHCConfigError(
                "an mHC model with pipeline parallelism sends [s, b, n*C] between stages; call "
                "mhc_megatron.training.megatron_patches.install_pipeline_streams() before "
                "building it (pretrain_mhc.py does)"
            )


def check_first_stage_has_layers(model: torch.nn.Module) -> None:
    """Refuses an embedding-only first pipeline stage: the first decoder layer enters the streams.

    Raises:
        MHCConfigError: the stage holds the embedding and no decoder layer.
    """
    if model.pre_process and not model.post_process and len(model.decoder.layers) == 0:
        raise MHCConfigError(
            "this pipeline layout puts the embedding on a stage without decoder layers; mHC "
            "enters the n streams in the model's first decoder layer, so give the first stage "
            "at least one layer (--pipeline-model-parallel-layout without a lone 'E' stage, or "
            "without --account-for-embedding-in-pipeline-split)"
        )


def _log_recompute_blocks(config: MHCTransformerConfig, stage_layers: int, vp_stage) -> None:
    """Logs the recompute block length chosen and the paper's optimum, once per stage."""
    n, block = config.mhc_num_streams, config.mhc_recompute_layers or stage_layers
    where = "" if vp_stage is None else f" (virtual stage {vp_stage})"
    logger.info(
        f"mHC recompute: blocks of {block} layer(s) on this pipeline stage{where}, which has "
        f"{stage_layers}; optimum sqrt(n*L/(n+2)) = "
        f"{optimal_block_layers(n, stage_layers):.1f} for n={n}, L={stage_layers} "
        f"({optimal_block_layers(n, config.num_layers):.1f} for all {config.num_layers} layers)"
    )


def _log_expert_module(model: torch.nn.Module) -> None:
    """Logs which module runs the routed experts (the GEMM path decides the MoE step time)."""
    for name, module in model.named_modules():
        if name.endswith("mlp.experts"):
            kind = type(module).__name__
            hint = {
                "SequentialMLP": "; --moe-grouped-gemm runs them as grouped GEMMs",
                "GroupedGemmMLP": ", torch grouped_mm on stacked weights",
            }.get(kind, "")
            logger.info(f"MoE experts: {kind}, {module.num_local_experts} local per layer{hint}")
            return


def mark_expert_parameters(model: torch.nn.Module) -> None:
    """Tags routed-expert parameters as expert-parallel at every expert-parallel size.

    Megatron 0.19.2 tags them ``allreduce=False`` (reduced over the expert data-parallel group,
    given their own grad buffer and optimizer) only when ``expert_model_parallel_size > 1``; at
    EP1 they join the dense optimizer. The optimizer part of a checkpoint then has one entry at
    EP1 and two at EP2, and ``ChainedOptimizer.load_state_dict`` refuses to resume across that
    change ("Expected 2 entries in state dict, but got 4"). At EP1 the expert data-parallel group
    holds the same ranks as the data-parallel group, so the tag changes no arithmetic, only where
    the state lives: checkpoints then resume between EP1 and EP2 in both directions.
    """
    for name, param in model.named_parameters():
        if ".experts." in f".{name}" and getattr(param, "allreduce", None) is True:
            param.allreduce = False


def build_mhc_gpt_model(
    config: MHCTransformerConfig,
    vocab_size: int,
    max_sequence_length: int,
    pre_process: bool = True,
    post_process: bool = True,
    **gpt_kwargs,
) -> torch.nn.Module:
    """Builds one model stage directly (tests, notebooks), without ``pretrain()``.

    Args:
        config: MHCTransformerConfig (variant residual: the stock decoder).
        vocab_size: padded vocabulary size.
        max_sequence_length: s.
        pre_process: this stage holds the embedding (its first layer enters the streams).
        post_process: this stage holds the final norm (and collapses) and the output layer.
        **gpt_kwargs: further GPTModel arguments (position_embedding_type, ...).
    """
    check_pipeline_streams(config)
    allowed = inspect.signature(GPTModel.__init__).parameters
    unknown = set(gpt_kwargs) - set(allowed)
    if unknown:
        raise TypeError(f"unknown GPTModel arguments: {sorted(unknown)}")
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_mhc_decoder_block_spec(config),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        **gpt_kwargs,
    )
    if config.mhc_enabled:
        check_first_stage_has_layers(model)
    return model
