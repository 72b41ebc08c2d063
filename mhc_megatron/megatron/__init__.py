"""The package that imports megatron.core: config, sites, layers, streams, specs, model builder."""

from mhc_megatron.megatron.config import (
    MHCConfigError,
    MHCMLATransformerConfig,
    MHCTransformerConfig,
    to_mhc_config,
)
from mhc_megatron.megatron.layer import MHCTransformerLayer
from mhc_megatron.megatron.model import (
    MHCGPTModelBuilder,
    MHCGPTModelConfig,
    build_mhc_gpt_model,
)
from mhc_megatron.megatron.site import MHCSite
from mhc_megatron.megatron.specs import get_mhc_decoder_block_spec

__all__ = [
    "MHCConfigError",
    "MHCGPTModelBuilder",
    "MHCGPTModelConfig",
    "MHCMLATransformerConfig",
    "MHCSite",
    "MHCTransformerConfig",
    "MHCTransformerLayer",
    "build_mhc_gpt_model",
    "get_mhc_decoder_block_spec",
    "to_mhc_config",
]
