"""The mHC GPT model in one process on CPU: equivalence with the plain GPTModel, gradients,
dtypes, the paper's hc init and the configuration errors."""

import pytest
import torch

from tests.megatron.models import MLA, MOE, build_model, mhc_config, token_inputs


@pytest.mark.parametrize("variant", ["mhc", "mhc-lite", "hc"])
@pytest.mark.parametrize("extra", [{}, MOE, {**MOE, **MLA}], ids=["dense", "moe", "moe-mla-local"])
def test_residual_init_matches_plain_gpt(extra, variant):
    """Spec section 4: scale 0, residual init and mean collapse compute the plain model."""
    torch.manual_seed(0)
    plain = build_model(mhc_config(mhc_variant="residual", **extra)).eval()
    mhc = build_model(
        mhc_config(mhc_variant=variant, mhc_init="residual", mhc_collapse="mean", **extra)
    ).eval()
    state = {
        k.replace("decoder.final_layernorm.", "decoder.final_layernorm.norm."): v
        for k, v in plain.state_dict().items()
    }
    result = mhc.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all("hyper_connection" in k for k in result.missing_keys)
    for name, param in mhc.named_parameters():
        if name.endswith("hyper_connection.scale"):
            param.data.zero_()
        if name.endswith("hyper_connection.fn"):
            param.data.normal_()  # irrelevant at scale 0: proves no other path reads fn
    ids, pos = token_inputs()
    with torch.no_grad():
        expected = plain(ids, pos, None)
        actual = mhc(ids, pos, None)
    # 1e-4 relative (spec section 4): the eps terms (h_pre = 1/n + eps, Sinkhorn's + eps) scale
    # the branch input by 1 + O(n * eps) before a norm that removes scale up to its own eps.
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
    # And the streams do matter once the mixing differs from the identity:
    for name, param in mhc.named_parameters():
        if name.endswith("hyper_connection.scale"):
            param.data.fill_(1.0)
    with torch.no_grad():
        assert not torch.allclose(mhc(ids, pos, None), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("variant", ["hc", "mhc", "mhc-lite"])
@pytest.mark.parametrize("collapse", ["head", "mean"])
def test_every_parameter_gets_a_gradient(variant, collapse):
    model = build_model(mhc_config(mhc_variant=variant, mhc_collapse=collapse, **MOE)).train()
    ids, pos = token_inputs()
    labels = torch.roll(ids, -1, dims=1)
    loss = model(ids, pos, None, labels=labels).float().mean()
    loss.backward()
    names = {n for n, _ in model.named_parameters()}
    assert any("mlp_hyper_connection.fn" in n for n in names)
    if collapse == "head":
        assert "decoder.final_layernorm.head_fn" in names
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, f"no gradient reached {missing}"


def test_mhc_parameters_stay_fp32_under_bf16():
    model = build_model(mhc_config(mhc_variant="mhc")).bfloat16()
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["decoder.layers.0.self_attention_hyper_connection.fn"] == torch.float32
    assert dtypes["decoder.final_layernorm.head_scale"] == torch.float32
    assert dtypes["embedding.word_embeddings.weight"] == torch.bfloat16


def test_hc_paper_init_reads_one_stream_per_layer():
    from mhc_megatron.megatron.site import static_logit_init

    base = static_logit_init("hc", "paper", n=4, layer_index=6)
    assert base[:4].tolist() == [0, 0, 1, 0] and base[4:8].tolist() == [1, 1, 1, 1]
    assert torch.equal(base[8:].view(4, 4), torch.eye(4))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(mhc_variant="hyper"), "mhc_variant='hyper' is unknown; use one of residual, hc"),
        (dict(mhc_num_streams=0), "mhc_num_streams=0 must be an integer from 1 to 16"),
        (dict(hidden_size=30), "hidden_size=30 is not a multiple of num_attention_heads=4"),
        (dict(mhc_sinkhorn_iters=0), "--mhc-sinkhorn-iters"),
        (
            dict(mhc_backend="triton", mhc_num_streams=16),
            "mhc_num_streams=16 is not supported by the fused kernels",
        ),
        (dict(fused_residual_rmsnorm=True, normalization="RMSNorm"), "--fused-residual-rmsnorm"),
        (dict(mhc_recompute="often"), "use none, stage or a block length"),
        (dict(mhc_recompute="0"), "use none, stage or a block length"),
        (dict(fp32_residual_connection=True), "drop the flag"),
        (
            dict(mhc_variant="mhc-lite", mhc_num_streams=7),
            "mhc_num_streams=7 is above 6 (--mhc-num-streams",
        ),
    ],
)
def test_bad_configs_say_what_to_change(overrides, message):
    from mhc_megatron.megatron import MHCConfigError

    with pytest.raises(MHCConfigError, match=message.replace("(", r"\(").replace("*", r"\*")):
        mhc_config(**overrides)
