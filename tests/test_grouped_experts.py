"""GroupedGemmMLP (``mhc_megatron/megatron/experts.py``): torch's grouped GEMM for the MoE
experts without TransformerEngine, against Megatron's SequentialMLP on CPU.

Same parameters and checkpoint keys; outputs and every gradient (input, routing probabilities,
each expert's weights and biases) on the same weights and tokens, including experts that
receive no tokens; and a whole mHC MoE model built with ``moe_grouped_gemm``.
"""

import pytest
import torch
import torch.nn.functional as F

from mhc_megatron.megatron.experts import GroupedGemmMLP
from tests.test_mhc_model import MOE, _build, _config, _inputs, single_rank  # noqa: F401

HIDDEN, FFN = 32, 24
TOKENS_PER_EXPERT = (5, 0, 7, 4)  # expert 1 gets no tokens

# (rtol, atol as a fraction of the largest reference entry). Both run the same products and
# sums; grouped_mm and per-expert matmuls may block the H-long (fc1) and F-long (fc2) sums
# differently: fp32 rounding, a few ulps. bf16 outputs are rounded once more: one bf16 ulp.
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2**-7, 2**-7)}


def _experts(dtype, **overrides):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
    from megatron.core.process_groups_config import ProcessGroupCollection

    settings = dict(
        hidden_size=HIDDEN, num_moe_experts=len(TOKENS_PER_EXPERT), moe_ffn_hidden_size=FFN,
        ffn_hidden_size=FFN, params_dtype=dtype, bf16=dtype == torch.bfloat16,
        gated_linear_unit=True, activation_func=F.silu, bias_activation_fusion=False,
    )  # fmt: skip
    config = _config(**{**settings, **overrides})
    pg = ProcessGroupCollection.use_mpu_process_groups()
    layer = get_gpt_layer_local_submodules(num_experts=config.num_moe_experts).mlp
    sequential = layer(config=config, pg_collection=pg).experts
    experts = layer.keywords["submodules"].experts
    grouped = GroupedGemmMLP(
        config.num_moe_experts, config, experts.keywords["submodules"], pg_collection=pg
    )
    grouped.load_state_dict(sequential.state_dict())
    return sequential, grouped


def _run(experts, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = sum(TOKENS_PER_EXPERT)
    x = torch.randn(tokens, HIDDEN, generator=gen).to(dtype).requires_grad_()
    probs = torch.rand(tokens, generator=gen).requires_grad_()  # fp32, as the router gives
    grad = torch.randn(tokens, HIDDEN, generator=gen).to(dtype)
    for param in experts.parameters():
        param.grad = None
    out, bias = experts(x, torch.tensor(TOKENS_PER_EXPERT), probs)
    assert bias is None
    out.backward(grad)
    named = {name: p.grad for name, p in experts.named_parameters()}
    return {"out": out.detach(), "d_x": x.grad, "d_probs": probs.grad, **named}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "overrides",
    [
        {},  # SwiGLU, no bias: the paper's experts
        dict(bias_activation_fusion=True),  # Megatron's fused weighted SwiGLU
        dict(gated_linear_unit=False, activation_func=F.gelu),
    ],
    ids=["swiglu", "swiglu-fused", "gelu"],
)
def test_same_numbers_as_sequential_mlp(dtype, overrides):
    sequential, grouped = _experts(dtype, **overrides)
    assert grouped.grouped(torch.zeros(1, HIDDEN, dtype=dtype))  # not the fallback loop
    want, got = _run(sequential, dtype), _run(grouped, dtype)
    assert got.keys() == want.keys()
    rtol, atol = TOLERANCES[dtype]
    for name, expected in want.items():
        scale = expected.abs().max().item()
        torch.testing.assert_close(got[name], expected, rtol=rtol, atol=atol * scale, msg=name)
    # Expert 1 got no tokens: its weight gradients are zero, as in SequentialMLP.
    assert not got["local_experts.1.linear_fc1.weight"].any()


@pytest.mark.parametrize("glu", [True, False])
def test_expert_biases(glu):
    """With biases (fc1's added before the activation, fc2's times the routing probability),
    against the experts' own Linear weights applied one expert at a time. SequentialMLP cannot
    be the reference here: at TP = EP = 1 its fc2 bias is added in place to a view that
    autograd refuses (Megatron 0.19.2, mlp.py:354)."""
    activation = F.silu if glu else F.gelu
    _, grouped = _experts(torch.float32, add_bias_linear=True, gated_linear_unit=glu,
                          activation_func=activation)  # fmt: skip
    got = _run(grouped, torch.float32)

    def per_expert(x, probs):
        outputs = []
        rows = zip(
            grouped.local_experts,
            x.split(TOKENS_PER_EXPERT),
            probs.split(TOKENS_PER_EXPERT),
            strict=True,
        )
        for expert, xe, pe in rows:
            fc1, fc2 = expert.linear_fc1, expert.linear_fc2
            h = F.linear(xe, fc1.weight, fc1.bias)
            if glu:
                gate, up = h.chunk(2, dim=-1)
                h = activation(gate) * up
            else:
                h = activation(h)
            outputs.append(F.linear(h * pe[:, None], fc2.weight) + fc2.bias * pe[:, None])
        return torch.cat(outputs)

    class Loop(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.local_experts = grouped.local_experts

        def forward(self, x, tokens_per_expert, probs):
            return per_expert(x, probs), None

    want = _run(Loop(), torch.float32)
    for name, expected in want.items():
        torch.testing.assert_close(
            got[name], expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item(), msg=name
        )


def test_same_parameters_and_checkpoint_layout():
    sequential, grouped = _experts(torch.float32)
    assert list(grouped.state_dict()) == list(sequential.state_dict())
    mine, theirs = (m.sharded_state_dict(prefix="mlp.experts.") for m in (grouped, sequential))
    assert mine.keys() == theirs.keys()
    for key, ref in theirs.items():
        got = mine[key]
        assert type(got) is type(ref), key
        if hasattr(ref, "global_shape"):
            assert (got.key, got.global_shape, got.global_offset) == (
                ref.key, ref.global_shape, ref.global_offset
            ), key  # fmt: skip


def test_falls_back_where_grouped_mm_cannot_run():
    """Rows that are not a multiple of 16 bytes (hidden 30 in fp32... 120 bytes is, 30 bf16 is
    60 bytes: not): the loop runs instead, with the same result."""
    global HIDDEN
    saved, HIDDEN = HIDDEN, 30
    try:
        sequential, grouped = _experts(torch.bfloat16, num_attention_heads=2)
        assert not grouped.grouped(torch.zeros(1, HIDDEN, dtype=torch.bfloat16))
        want, got = _run(sequential, torch.bfloat16), _run(grouped, torch.bfloat16)
        for name, expected in want.items():
            assert torch.equal(got[name], expected), name
    finally:
        HIDDEN = saved


def test_mhc_model_with_grouped_gemm_experts_trains_like_sequential():
    torch.manual_seed(0)
    reference = _build(_config(**MOE)).train()
    grouped = _build(_config(**MOE, moe_grouped_gemm=True)).train()
    kinds = {type(m).__name__ for m in grouped.modules()}
    assert "GroupedGemmMLP" in kinds and "SequentialMLP" not in kinds
    assert list(grouped.state_dict()) == list(reference.state_dict())
    grouped.load_state_dict(reference.state_dict())
    ids, pos = _inputs()
    labels = torch.roll(ids, -1, dims=1)
    results = []
    for model in (reference, grouped):
        loss = model(ids, pos, None, labels=labels).float().mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_ref, grads_ref), (loss, grads) = results
    # fp32; the expert GEMMs sum in another blocking: float32 rounding.
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-7)
    for name, expected in grads_ref.items():
        torch.testing.assert_close(
            grads[name], expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item(), msg=name
        )


def test_expanded_output_gradient():
    """A ``sum()`` loss hands the experts a stride-0 gradient, which grouped_mm's backward
    refuses; the grouped linears make it contiguous first."""
    sequential, grouped = _experts(torch.float32)
    grads = []
    for experts in (sequential, grouped):
        x = torch.randn(sum(TOKENS_PER_EXPERT), HIDDEN, generator=torch.Generator().manual_seed(1))
        x.requires_grad_()
        probs = torch.full((x.shape[0],), 0.5)
        experts(x, torch.tensor(TOKENS_PER_EXPERT), probs)[0].sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6 * grads[0].abs().max())
