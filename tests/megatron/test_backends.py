"""--mhc-backend: which implementation runs the sites, and the fused kernels against the torch
ops on a whole model."""

import os

import pytest
import torch

from tests.megatron.models import MOE, build_model, count_chained_passes, mhc_config, token_inputs


def test_backend_resolution(monkeypatch):
    from mhc_megatron.megatron import MHCConfigError
    from mhc_megatron.megatron.backend import resolve_backend

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_backend(mhc_config(mhc_backend="torch"), cuda) == "torch"
    assert resolve_backend(mhc_config(mhc_backend="auto"), cpu) == "torch"
    assert resolve_backend(mhc_config(mhc_backend="auto"), cuda) == "triton"
    # n > 8: auto falls back to the torch ops instead of failing.
    assert resolve_backend(mhc_config(mhc_backend="auto", mhc_num_streams=16), cuda) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend(mhc_config(mhc_backend="triton"), cpu) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(MHCConfigError, match="needs CUDA tensors, got cpu"):
        resolve_backend(mhc_config(mhc_backend="triton"), cpu)


@pytest.mark.parametrize("variant", ["mhc", "mhc-lite"])
def test_triton_backend_trains_the_same_model_as_torch(variant, monkeypatch):
    """--mhc-backend triton (the fused kernels, here in Triton's interpreter) against the torch
    ops on a whole MoE model: logits and every parameter's gradient, fp32. mhc-lite keeps torch
    coefficients and uses the fused mixes. With mhc, every site after the first chains its
    backward to the previous site's exit, within a layer and across layers."""
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
    chained = count_chained_passes(monkeypatch)
    torch.manual_seed(0)
    reference = build_model(mhc_config(mhc_backend="torch", mhc_variant=variant, **MOE)).train()
    fused = build_model(mhc_config(mhc_backend="triton", mhc_variant=variant, **MOE)).train()
    for name, param in reference.named_parameters():
        if name.endswith("hyper_connection.scale"):
            param.data.fill_(0.5)  # large enough that the streams mix unevenly
    fused.load_state_dict(reference.state_dict())
    ids, pos = token_inputs()
    labels = torch.roll(ids, -1, dims=1)
    outputs = {}
    for name, model in (("torch", reference), ("triton", fused)):
        loss = model(ids, pos, None, labels=labels).float().mean()
        loss.backward()
        outputs[name] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    # fp32 throughout; the kernels sum in other orders than the torch ops (blocked GEMM for the
    # projection, per-token loops for the mixes): ~1e-6 relative per op. Gradients are compared
    # relative to each tensor's largest entry: the collapse head's are sums over tokens with
    # heavy cancellation, measured 2.4e-5 of their max (every other tensor <= 3e-6).
    torch.testing.assert_close(outputs["triton"][0], outputs["torch"][0], rtol=1e-5, atol=1e-6)
    worst = {
        name: ((outputs["triton"][1][name] - grad).abs().max() / grad.abs().max()).item()
        for name, grad in outputs["torch"][1].items()
    }
    assert max(worst.values()) < 2e-4, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    # 3 layers, 6 sites: 5 chained pairs with mhc; mhc-lite's torch coefficients run unfused.
    assert len(chained) == (5 if variant == "mhc" else 0)
