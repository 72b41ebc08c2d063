"""GroupedGemmMLP (``mhc_megatron/megatron/experts.py``): torch's grouped GEMM for the MoE
experts without TransformerEngine, against Megatron's SequentialMLP on CPU.

Same initial weights (stacked) and torch_dist checkpoints that load both ways; outputs and every
gradient (input, routing probabilities, each expert's weights and biases) on the same weights and
tokens, including experts that receive no tokens; the activation recompute; no stacked copy of
the weights kept for the backward; and a whole mHC MoE model built with ``moe_grouped_gemm``.
"""

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

from mhc_megatron.megatron.experts import GroupedGemmMLP, stack_sequential_state
from tests.megatron.models import MOE, build_model, mhc_config, token_inputs

HIDDEN, FFN = 32, 24
TOKENS_PER_EXPERT = (5, 0, 7, 4)  # expert 1 gets no tokens

# (rtol, atol as a fraction of the largest reference entry). Both run the same products and
# sums; grouped_mm and per-expert matmuls may block the H-long (fc1) and F-long (fc2) sums
# differently: fp32 rounding, a few ulps. bf16 outputs are rounded once more: one bf16 ulp.
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2**-7, 2**-7)}


def _expert_submodules(config):
    """The MLP submodules Megatron's local spec gives its MoE experts."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules

    layer = get_gpt_layer_local_submodules(num_experts=config.num_moe_experts).mlp
    return layer.keywords["submodules"].experts.keywords["submodules"]


def _experts(dtype, **overrides):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
    from megatron.core.process_groups_config import ProcessGroupCollection

    settings = dict(
        hidden_size=HIDDEN, num_moe_experts=len(TOKENS_PER_EXPERT), moe_ffn_hidden_size=FFN,
        ffn_hidden_size=FFN, params_dtype=dtype, bf16=dtype == torch.bfloat16,
        gated_linear_unit=True, activation_func=F.silu, bias_activation_fusion=False,
    )  # fmt: skip
    config = mhc_config(**{**settings, **overrides})
    pg = ProcessGroupCollection.use_mpu_process_groups()
    layer = get_gpt_layer_local_submodules(num_experts=config.num_moe_experts).mlp
    sequential = layer(config=config, pg_collection=pg).experts
    grouped = GroupedGemmMLP(
        config.num_moe_experts, config, _expert_submodules(config), pg_collection=pg
    )
    grouped.load_state_dict(sequential.state_dict())  # per-expert keys stacked on load
    return sequential, grouped


def _stacked(named: dict, module: torch.nn.Module) -> dict:
    """SequentialMLP-named tensors under GroupedGemmMLP's names (a copy)."""
    named = dict(named)
    for name, sub in module.named_modules():
        if isinstance(sub, GroupedGemmMLP | SequentialMLP):
            stack_sequential_state(named, f"{name}." if name else "", sub.num_local_experts)
    return named


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
    if isinstance(experts, SequentialMLP):
        named = _stacked(named, experts)
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
    assert not got["linear_fc1.weight"][1].any() and got["linear_fc1.weight"][0].any()


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
        rows = zip(x.split(TOKENS_PER_EXPERT), probs.split(TOKENS_PER_EXPERT), strict=True)
        fc1, fc2 = grouped.linear_fc1, grouped.linear_fc2
        for e, (xe, pe) in enumerate(rows):
            h = F.linear(xe, fc1.weight[e], fc1.bias[e])
            if glu:
                gate, up = h.chunk(2, dim=-1)
                h = activation(gate) * up
            else:
                h = activation(h)
            outputs.append(F.linear(h * pe[:, None], fc2.weight[e]) + fc2.bias[e] * pe[:, None])
        return torch.cat(outputs)

    class Loop(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear_fc1, self.linear_fc2 = grouped.linear_fc1, grouped.linear_fc2

        def forward(self, x, tokens_per_expert, probs):
            return per_expert(x, probs), None

    want = _run(Loop(), torch.float32)
    for name, expected in want.items():
        torch.testing.assert_close(
            got[name], expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item(), msg=name
        )


def _built_from_seed(cls, config, seed):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)  # --use-cpu-initialization draws from torch's default generator
    model_parallel_cuda_manual_seed(seed)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    return cls(config.num_moe_experts, config, _expert_submodules(config), pg_collection=pg)


def _config_for(glu: bool, bias: bool):
    return mhc_config(
        hidden_size=HIDDEN, num_moe_experts=len(TOKENS_PER_EXPERT), moe_ffn_hidden_size=FFN,
        ffn_hidden_size=FFN, gated_linear_unit=glu, activation_func=F.silu if glu else F.gelu,
        add_bias_linear=bias, bias_activation_fusion=False,
    )  # fmt: skip


def test_starts_from_sequential_mlps_weights():
    """Built from the same seed, the stacked parameters are SequentialMLP's experts' weights, with
    Megatron's parameter tags (partition_dim moved by the stacked expert axis)."""
    config = _config_for(glu=True, bias=True)
    sequential = _built_from_seed(SequentialMLP, config, seed=5)
    grouped = _built_from_seed(GroupedGemmMLP, config, seed=5)
    want = _stacked(dict(sequential.named_parameters()), sequential)
    got = dict(grouped.named_parameters())
    assert (
        got.keys()
        == want.keys()
        == {f"linear_fc{i}.{w}" for i in (1, 2) for w in ("weight", "bias")}
    )
    for name, expected in want.items():
        assert torch.equal(got[name], expected), name
    weight = grouped.linear_fc1.weight
    assert weight.shape == (len(TOKENS_PER_EXPERT), 2 * FFN, HIDDEN)
    assert (weight.tensor_model_parallel, weight.partition_dim) == (True, 1)
    assert grouped.linear_fc2.weight.partition_dim == 2


@pytest.mark.parametrize("glu, bias", [(True, False), (False, True), (True, True)])
def test_torch_dist_checkpoints_load_both_ways(tmp_path, glu, bias):
    """A torch_dist checkpoint saved by SequentialMLP loads into GroupedGemmMLP and the other way
    round: the same sharded keys, global shapes and offsets (the gated fc1 saved as its two
    halves, as Megatron's swiglu factory), and the same extra-state objects."""
    from megatron.core import dist_checkpointing

    config = _config_for(glu, bias)
    for index, (saver_cls, loader_cls) in enumerate(
        [(SequentialMLP, GroupedGemmMLP), (GroupedGemmMLP, SequentialMLP)]
    ):
        saver = _built_from_seed(saver_cls, config, seed=10 + index)
        loader = _built_from_seed(loader_cls, config, seed=20 + index)
        directory = tmp_path / f"saved_by_{saver_cls.__name__}"
        directory.mkdir()
        dist_checkpointing.save(saver.sharded_state_dict(prefix="mlp.experts."), str(directory))
        loaded = dist_checkpointing.load(loader.sharded_state_dict(prefix="mlp.experts."),
                                         str(directory))  # fmt: skip
        loader.load_state_dict({k.removeprefix("mlp.experts."): v for k, v in loaded.items()})
        want, got = dict(saver.named_parameters()), dict(loader.named_parameters())
        want, got = (_stacked(d, m) for d, m in ((want, saver), (got, loader)))
        assert got.keys() == want.keys()
        for name, expected in want.items():
            assert torch.equal(got[name], expected), (saver_cls.__name__, name)


def test_no_stacked_copy_of_the_weights_is_kept_for_backward():
    """The GEMMs read the stacked parameters themselves: every weight-sized tensor autograd
    keeps for the backward is a parameter's own storage (a per-step ``torch.stack`` would keep
    a copy of every expert's weights per layer until the backward)."""
    _, grouped = _experts(torch.float32)
    params = {p.untyped_storage().data_ptr() for p in grouped.parameters()}
    kept = []

    def pack(tensor):
        kept.append(tensor)
        return tensor

    x = torch.randn(sum(TOKENS_PER_EXPERT), HIDDEN, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        grouped(x, torch.tensor(TOKENS_PER_EXPERT), torch.rand(x.shape[0]))
    weight_sized = [t for t in kept if t.numel() >= grouped.linear_fc2.weight.numel()]
    assert weight_sized, "no weight saved for the backward at all?"
    assert all(t.untyped_storage().data_ptr() in params for t in weight_sized)


def test_moe_act_recompute_gives_the_same_gradients():
    """``--recompute-granularity selective --recompute-modules moe_act``: the activation is
    recomputed in the backward (as in TEGroupedMLP), with bitwise the same results."""
    _, grouped = _experts(torch.float32)
    want = _run(grouped, torch.float32)
    _, recomputing = _experts(
        torch.float32,
        moe_grouped_gemm=True,
        recompute_granularity="selective",
        recompute_modules=["moe_act"],
    )
    assert recomputing.activation_recompute and not grouped.activation_recompute
    recomputing.load_state_dict(grouped.state_dict())
    got = _run(recomputing, torch.float32)
    for name, expected in want.items():
        assert torch.equal(got[name], expected), name

    def activation_freed(experts) -> bool:
        """Whether fc2's saved input (the activation, [rows, FFN]) is released after forward."""
        kept = []
        x = torch.randn(sum(TOKENS_PER_EXPERT), HIDDEN, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            experts(x, torch.tensor(TOKENS_PER_EXPERT), torch.rand(x.shape[0]))
        activations = [t for t in kept if t.shape == (x.shape[0], FFN)]
        assert activations
        return any(t.untyped_storage().size() == 0 for t in activations)

    assert activation_freed(recomputing) and not activation_freed(grouped)


def test_falls_back_where_grouped_mm_cannot_run(caplog):
    """Rows that are not a multiple of 16 bytes (hidden 30 in fp32... 120 bytes is, 30 bf16 is
    60 bytes: not): the loop runs instead, with the same result."""
    global HIDDEN
    saved, HIDDEN = HIDDEN, 30
    try:
        sequential, grouped = _experts(torch.bfloat16, num_attention_heads=2)
        assert not grouped.grouped(torch.zeros(1, HIDDEN, dtype=torch.bfloat16))
        GroupedGemmMLP._warned_loop = False
        with caplog.at_level("WARNING", logger="mhc_megatron.megatron.experts"):
            want, got = _run(sequential, torch.bfloat16), _run(grouped, torch.bfloat16)
        assert "the experts run one by one" in caplog.text  # said, not silent
        for name, expected in want.items():
            assert torch.equal(got[name], expected), name
    finally:
        HIDDEN = saved


def test_mhc_model_with_grouped_gemm_experts_trains_like_sequential():
    torch.manual_seed(0)
    reference = build_model(mhc_config(**MOE)).train()
    grouped = build_model(mhc_config(**MOE, moe_grouped_gemm=True)).train()
    kinds = {type(m).__name__ for m in grouped.modules()}
    assert "GroupedGemmMLP" in kinds and "SequentialMLP" not in kinds
    grouped.load_state_dict(reference.state_dict())  # per-expert keys stacked on load
    ids, pos = token_inputs()
    labels = torch.roll(ids, -1, dims=1)
    results = []
    for model in (reference, grouped):
        loss = model(ids, pos, None, labels=labels).float().mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_ref, grads_ref), (loss, grads) = results
    grads_ref = _stacked(grads_ref, reference)
    assert grads.keys() == grads_ref.keys()
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
