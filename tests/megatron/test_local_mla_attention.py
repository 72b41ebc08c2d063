"""Multi-Latent Attention without TransformerEngine: the local core attention (attention.py)."""

import pytest
import torch

from tests.megatron.models import mhc_config


def test_local_mla_core_attention_matches_explicit_causal_attention():
    """LocalMLACoreAttention (key head dim 12, value head dim 8) against softmax(q k^T s + causal
    mask) v written out, outputs and the gradients of q, k and v, in fp64."""
    from megatron.core.transformer.enums import AttnMaskType

    from mhc_megatron.megatron.attention import LocalMLACoreAttention

    config = mhc_config(num_attention_heads=2)
    attention = LocalMLACoreAttention(
        config=config, layer_number=1, attn_mask_type=AttnMaskType.causal,
        attention_type="self", softmax_scale=0.3, k_channels=12, v_channels=8,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    sq, b, heads = 6, 2, 2
    q, k = (torch.randn(sq, b, heads, 12, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(sq, b, heads, 8, generator=gen, dtype=torch.float64)
    for t in (q, k, v):
        t.requires_grad_(True)
    out = attention(q, k, v, attention_mask=None)
    assert out.shape == (sq, b, heads * 8)

    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) * 0.3
    future = torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)
    probs = scores.masked_fill(future, float("-inf")).softmax(-1)
    expected = torch.einsum("bhqk,kbhd->qbhd", probs, v).reshape(sq, b, heads * 8)
    # fp64 both ways: only rounding differs.
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    expected_grads = torch.autograd.grad(expected, (q, k, v), dout)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_local_mla_core_attention_refuses_what_it_cannot_compute():
    from megatron.core.transformer.enums import AttnMaskType

    from mhc_megatron.megatron import MHCConfigError
    from mhc_megatron.megatron.attention import LocalMLACoreAttention

    with pytest.raises(MHCConfigError, match="causal attention only.*transformer_engine"):
        LocalMLACoreAttention(
            config=mhc_config(), layer_number=1, attn_mask_type=AttnMaskType.no_mask,
            attention_type="self", k_channels=12, v_channels=8,
        )  # fmt: skip
