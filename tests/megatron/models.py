"""Shared builders of the in-process model tests: a small mHC GPT config, model and batch."""

import torch

from mhc_megatron.training.cpu_settings import CPU_CONFIG


def mhc_config(**overrides):
    from mhc_megatron.megatron import MHCMLATransformerConfig, MHCTransformerConfig

    settings = dict(
        num_layers=3,
        hidden_size=32,
        num_attention_heads=4,
        use_cpu_initialization=True,
        **CPU_CONFIG,  # the local modules, no GPU fusions
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=False,
        normalization="RMSNorm",
    )
    settings.update(overrides)
    if settings.get("multi_latent_attention"):
        return MHCMLATransformerConfig(**settings)
    return MHCTransformerConfig(**settings)


MOE = dict(
    num_moe_experts=4,
    moe_router_topk=2,
    moe_layer_freq=[0, 1, 1],  # one leading dense layer, as the paper's models
    moe_ffn_hidden_size=32,
    moe_token_dispatcher_type="alltoall",
)


def build_model(config):
    from megatron.core.transformer.moe.router import MoEAuxLossAutoScaler

    from mhc_megatron.megatron import build_mhc_gpt_model

    # A second MoE forward/backward in one process trips over the scale left by the first.
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    return build_mhc_gpt_model(
        config, vocab_size=64, max_sequence_length=16, position_embedding_type="rope"
    )


def token_inputs():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, 16), generator=gen)
    return ids, torch.arange(16).expand(2, 16)


# Multi-Latent Attention as in the paper recipes, small; rope_type "rope" since the local
# core attention (mhc_megatron/megatron/attention.py) is what builds it without TE.
MLA = dict(
    multi_latent_attention=True,
    kv_lora_rank=16,
    qk_head_dim=8,
    qk_pos_emb_head_dim=4,
    v_head_dim=8,
    rope_type="rope",
)


def loss_and_grads(model):
    ids, pos = token_inputs()
    labels = torch.roll(ids, -1, dims=1)
    loss = model(ids, pos, None, labels=labels).float().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def count_chained_passes(monkeypatch) -> list:
    """Counts the chained backward passes of fused sites in a row (kernels.chain)."""
    from mhc_megatron.kernels import chain

    calls, real = [], chain.backward_x_chain
    monkeypatch.setattr(chain, "backward_x_chain", lambda *a: calls.append(1) or real(*a))
    return calls
