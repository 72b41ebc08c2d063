"""``mhc_transformer_config_from_args``: the mHC TransformerConfig comes out of Megatron's own
builder, built and validated once (issue 16: it used to be built as a TransformerConfig and then
rebuilt as the mHC one, running Megatron's validation twice)."""

import sys

from megatron.core.transformer import TransformerConfig
from megatron.training.arguments import parse_args, validate_args

from mhc_megatron.megatron.config import MHCTransformerConfig
from mhc_megatron.training.arguments import add_mhc_args, mhc_transformer_config_from_args

ARGV = [
    "pretrain_mhc.py", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "1",
    "--transformer-impl", "local", "--mhc-num-streams", "2", "--mhc-sinkhorn-iters", "7",
]  # fmt: skip


def test_the_mhc_config_is_built_and_validated_once(monkeypatch):
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", ARGV)
    args = parse_args(extra_args_provider=add_mhc_args)
    validate_args(args)
    built = []
    validate = TransformerConfig.__post_init__

    def counting_post_init(self):
        built.append(type(self).__name__)
        validate(self)

    # Every config class's validation ends in TransformerConfig's (MHC's calls super()).
    monkeypatch.setattr(TransformerConfig, "__post_init__", counting_post_init)
    config = mhc_transformer_config_from_args(args)
    assert built == ["MHCTransformerConfig"]
    assert isinstance(config, MHCTransformerConfig)
    assert (config.mhc_num_streams, config.mhc_sinkhorn_iters) == (2, 7)  # from the --mhc-* flags
    assert (config.num_layers, config.hidden_size) == (2, 64)  # and Megatron's own
