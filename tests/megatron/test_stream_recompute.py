"""Stage-aligned stream recompute (--mhc-recompute): same gradients, fewer saved bytes."""

import pytest
import torch

from tests.megatron.models import (
    MOE,
    build_model,
    count_chained_passes,
    loss_and_grads,
    mhc_config,
    token_inputs,
)


@pytest.mark.parametrize(
    "recompute, backend", [("stage", "torch"), ("1", "torch"), ("2", "torch"), ("2", "triton")]
)
def test_stream_recompute_gives_the_same_gradients(recompute, backend, monkeypatch):
    """--mhc-recompute rebuilds the streams in backward instead of keeping them: the loss is
    bitwise the same (the forward runs the same ops) and so is every gradient up to the order in
    which a stream's gradient contributions are summed. With the triton backend the rebuild and
    the recomputed mixing run the fused kernels."""
    torch.manual_seed(0)
    settings = dict(num_layers=4, moe_layer_freq=[0, 1, 1, 1], mhc_backend=backend)
    reference = build_model(mhc_config(**{**MOE, **settings})).train()
    for name, param in reference.named_parameters():
        if name.endswith("hyper_connection.scale"):
            param.data.fill_(0.5)  # the streams mix unevenly
    recomputing = build_model(mhc_config(**{**MOE, **settings}, mhc_recompute=recompute)).train()
    recomputing.load_state_dict(reference.state_dict())
    expected_loss, expected = loss_and_grads(reference)
    chained = count_chained_passes(monkeypatch)
    loss, grads = loss_and_grads(recomputing)
    assert torch.equal(loss, expected_loss)
    # triton: sites chain within a block (2 blocks of 2 layers, 4 sites each: 3 pairs each).
    assert len(chained) == (6 if backend == "triton" else 0)
    # Without recompute autograd sums a stream's gradient from coefficients, pre-mix and
    # post+res in one order; with it, coefficients + pre-mix arrive already summed: float32
    # rounding of the last bits only.
    worst = {n: ((grads[n] - g).abs().max() / g.abs().max()).item() for n, g in expected.items()}
    assert max(worst.values()) < 1e-5, sorted(worst.items(), key=lambda kv: -kv[1])[:5]


def test_stream_recompute_saves_fewer_activation_bytes():
    """Saved-for-backward bytes of one forward (saved-tensor hooks, recompute blocks' inputs
    included): mHC without recompute keeps the n-wide streams at every site; with it, a stage
    keeps one stream input and each site's C-wide branch output."""
    from mhc_megatron.megatron.recompute import saved_activation_bytes

    settings = dict(num_layers=4, moe_layer_freq=[0, 1, 1, 1], hidden_size=64, **{
        k: v for k, v in MOE.items() if k != "moe_layer_freq"})  # fmt: skip
    ids, pos = token_inputs()
    labels = torch.roll(ids, -1, dims=1)
    measured = {}
    for name, extra in [
        ("residual", dict(mhc_variant="residual")),
        ("mhc", dict(mhc_variant="mhc")),
        ("mhc_recompute", dict(mhc_variant="mhc", mhc_recompute="stage")),
    ]:
        model = build_model(mhc_config(**settings, **extra)).train()
        measured[name] = saved_activation_bytes(
            model, lambda m=model: m(ids, pos, None, labels=labels)
        )
    assert measured["mhc_recompute"] < measured["mhc"], measured
    # The goal, at most 1.3x the residual baseline: measured 1.23x on this model (mHC
    # without recompute: 2.9x). A byte count, not a timing: deterministic for a given model.
    assert measured["mhc_recompute"] < 1.3 * measured["residual"], measured
