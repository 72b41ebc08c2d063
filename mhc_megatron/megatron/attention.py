"""Core attention for Multi-Latent Attention without TransformerEngine.

Megatron-Core 0.19.2's local GPT spec puts ``DotProductAttention`` under MLA, but
``MLASelfAttention`` builds its core attention with ``k_channels``/``v_channels`` (the query/key
head dim ``qk_head_dim + qk_pos_emb_head_dim`` differs from the value head dim), which
``DotProductAttention`` does not accept, so a local-spec MLA model cannot be built. Only
TransformerEngine's attention takes them. ``LocalMLACoreAttention`` does, and computes causal
attention with ``torch.nn.functional.scaled_dot_product_attention``, which allows a value head
dim different from the key's. It has no parameters, so a model built with it has exactly the
parameters of the TransformerEngine model (what the recipe parameter counts rely on).
"""

import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import is_layer_window_attention

from mhc_megatron.megatron.config import MHCConfigError


class LocalMLACoreAttention(DotProductAttention):
    """Causal core attention whose key and value head dims may differ (MLA), local spec only.

    Takes Megatron's core-attention inputs ``query: [sq, b, np, hk]``, ``key: [sk, b, np, hk]``,
    ``value: [sk, b, np, hv]`` and returns ``[sq, b, np*hv]``.

    Constructed as ``DotProductAttention``, plus the ``k_channels`` (``hk``) and ``v_channels``
    (``hv``) keywords that ``MLASelfAttention`` passes; they are only recorded, the head dims
    are read from the inputs.
    """

    def __init__(self, *args, k_channels: int | None = None, v_channels: int | None = None,
                 **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        if self.attn_mask_type != AttnMaskType.causal:
            raise MHCConfigError(
                f"MLA without TransformerEngine supports causal attention only, got "
                f"{self.attn_mask_type}; use --transformer-impl transformer_engine"
            )
        if self.config.softmax_type != "vanilla" or is_layer_window_attention(
            self.config.window_size, self.config.window_attn_skip_freq, self.layer_number
        ):
            raise MHCConfigError(
                "MLA without TransformerEngine supports neither --softmax-type other than "
                "vanilla nor sliding-window attention; use --transformer-impl transformer_engine"
            )
        self.k_channels, self.v_channels = k_channels, v_channels
        # DotProductAttention divides its scale by the layer number under
        # apply_query_key_layer_scaling and multiplies it back inside its softmax; SDPA applies
        # one scale, so undo the division.
        if self.config.apply_query_key_layer_scaling:
            self.softmax_scale *= self.layer_number

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):  # fmt: skip
        """Causal attention.

        Args:
            query: [sq, b, np, hk].
            key: [sk, b, np, hk].
            value: [sk, b, np, hv].
            attention_mask: ignored: the mask is causal by construction (checked at build).
            attn_mask_type: must be causal or None.
            attention_bias: unsupported (must be None).
            packed_seq_params: unsupported (must be None).

        Returns:
            [sq, b, np*hv].
        """
        if packed_seq_params is not None or attention_bias is not None:
            raise MHCConfigError(
                "MLA without TransformerEngine supports neither packed sequences nor an "
                "attention bias; use --transformer-impl transformer_engine"
            )
        if attn_mask_type not in (None, AttnMaskType.causal):
            raise MHCConfigError(f"MLA without TransformerEngine: {attn_mask_type} unsupported")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, np, s, h]
        dropout = self.attention_dropout.p if self.training else 0.0
        if dropout > 0.0 and not self.config.sequence_parallel:
            # Same RNG stream as DotProductAttention's dropout: differs across TP ranks.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(
                    q, k, v, dropout_p=dropout, is_causal=True, scale=self.softmax_scale
                )
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=True, scale=self.softmax_scale
            )
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)  # [sq, b, np*hv]


def use_local_mla_core_attention(layer_spec) -> None:
    """Swaps the local spec's DotProductAttention for LocalMLACoreAttention, in place."""
    attention = layer_spec.submodules.self_attention
    if getattr(attention.submodules, "core_attention", None) is DotProductAttention:
        attention.submodules.core_attention = LocalMLACoreAttention
