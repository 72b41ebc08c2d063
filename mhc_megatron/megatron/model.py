"""The mHC GPT model, its Megatron model config and builder (the model provider)."""

import inspect
import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from megatron.core.models.gpt import GPTModel
from megatron.training.models.gpt import GPTModelBuilder, GPTModelConfig

from mhc_megatron import ops
from mhc_megatron.megatron.config import MHCConfigError, MHCTransformerConfig
from mhc_megatron.megatron.pipeline import install_pipeline_shape_hook
from mhc_megatron.megatron.recompute import optimal_block_layers
from mhc_megatron.megatron.specs import get_mhc_decoder_block_spec

logger = logging.getLogger(__name__)


class MHCGPTModel(GPTModel):
    """GPTModel whose decoder runs on n residual streams.

    The only change to GPTModel: on the first pipeline stage the embedding output
    ``[s, b, C]`` is copied into ``[s, b, n*C]`` (spec section 2). The layers and the collapse
    come from the spec (get_mhc_decoder_block_spec).
    """

    def _preprocess(self, *args, **kwargs):
        outputs = super()._preprocess(*args, **kwargs)
        decoder_input = outputs[0]
        if self.pre_process and decoder_input is not None and self.config.mhc_enabled:
            n = self.config.mhc_num_streams
            decoder_input = ops.expand_streams(decoder_input, n).flatten(-2)
            outputs = (decoder_input, *outputs[1:])
        return outputs


def mhc_layer_spec(model_config: "MHCGPTModelConfig", vp_stage: int | None = None):
    """``GPTModelConfig.transformer_layer_spec`` callable: the mHC decoder block spec."""
    return get_mhc_decoder_block_spec(model_config.transformer, vp_stage=vp_stage)


@dataclass(kw_only=True)
class MHCGPTModelConfig(GPTModelConfig):
    """GPTModelConfig that builds MHCGPTModel (only the builder differs)."""

    builder: ClassVar[str] = "mhc_megatron.megatron.model.MHCGPTModelBuilder"


class MHCGPTModelBuilder(GPTModelBuilder):
    """Builds MHCGPTModel stages for Megatron's ``pretrain()``; residual variant: GPTModel."""

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
        model = super().build_model(pg_collection, pre_process, post_process, vp_stage)
        if transformer.num_moe_experts:
            mark_expert_parameters(model)
            _log_expert_module(model)
        if transformer.mhc_enabled:
            if transformer.mhc_recompute_layers is not None:
                _log_recompute_blocks(transformer, len(model.decoder.layers), vp_stage)
            if transformer.pipeline_model_parallel_size > 1:
                install_pipeline_shape_hook()
            # GPTModelBuilder hard-codes GPTModel (megatron/training/models/gpt.py, 0.19.2);
            # MHCGPTModel adds no state and only overrides _preprocess, so the built instance
            # is re-classed instead of copying the builder's 60 lines.
            model.__class__ = MHCGPTModel
        return model


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
        config: MHCTransformerConfig; variant residual gives a plain GPTModel.
        vocab_size: padded vocabulary size.
        max_sequence_length: s.
        pre_process: this stage holds the embedding (and expands).
        post_process: this stage holds the final norm (and collapses) and the output layer.
        **gpt_kwargs: further GPTModel arguments (position_embedding_type, ...).
    """
    model_cls = MHCGPTModel if config.mhc_enabled else GPTModel
    if config.mhc_enabled and config.pipeline_model_parallel_size > 1:
        install_pipeline_shape_hook()
    allowed = inspect.signature(GPTModel.__init__).parameters
    unknown = set(gpt_kwargs) - set(allowed)
    if unknown:
        raise TypeError(f"unknown GPTModel arguments: {sorted(unknown)}")
    return model_cls(
        config=config,
        transformer_layer_spec=get_mhc_decoder_block_spec(config),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        **gpt_kwargs,
    )
