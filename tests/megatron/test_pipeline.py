"""Pipeline parallelism with n streams: the p2p wire shape and the patch that sizes the buffers."""

import pytest
import torch

from tests.megatron.models import build_model, mhc_config, token_inputs


def test_pipeline_wire_shape_is_n_streams_wide():
    from mhc_megatron.megatron.pipeline import pipeline_tensor_shape

    mhc = mhc_config(mhc_num_streams=3)
    assert pipeline_tensor_shape(mhc, (16, 2, 32)) == (16, 2, 96)
    assert pipeline_tensor_shape(mhc, [16, 2, 32]) == [16, 2, 96]  # the interleaved schedule's
    assert pipeline_tensor_shape(mhc, ()) == ()  # shapes exchanged at run time
    assert pipeline_tensor_shape(mhc_config(mhc_variant="residual"), (16, 2, 32)) == (16, 2, 32)
    from megatron.core.transformer import TransformerConfig

    plain = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4)
    assert pipeline_tensor_shape(plain, (16, 2, 32)) == (16, 2, 32)


def test_pipeline_patch_widens_what_the_communicator_allocates(monkeypatch):
    """The installed patch hands ``_communicate`` the widened shape, only for mHC configs, and
    installing it twice wraps Megatron's function once."""
    from megatron.core.pipeline_parallel import p2p_communication

    from mhc_megatron.megatron.pipeline import stream_shapes_installed
    from mhc_megatron.training import megatron_patches

    seen = []

    def communicate(self, *, tensor_send_next, tensor_send_prev, recv_prev, recv_next,
                    tensor_shape, wait_on_reqs=True):  # fmt: skip
        seen.append(tensor_shape)
        return None, None

    monkeypatch.setattr(p2p_communication.P2PCommunicator, "_communicate", communicate)
    assert not stream_shapes_installed()
    try:
        megatron_patches.install_pipeline_streams()
        megatron_patches.install_pipeline_streams()  # wraps the original again, not the wrapper
        assert stream_shapes_installed()
        patched = p2p_communication.P2PCommunicator._communicate
        assert patched.__wrapped__ is communicate
        kwargs = dict(tensor_send_next=None, tensor_send_prev=None, recv_prev=True, recv_next=False)
        for config in (mhc_config(mhc_num_streams=4), mhc_config(mhc_variant="residual")):
            communicator = type("Communicator", (), {"config": config})()
            patched(communicator, tensor_shape=(8, 2, 32), **kwargs)
        assert seen == [(8, 2, 128), (8, 2, 32)]
    finally:
        megatron_patches.uninstall()
    assert p2p_communication.P2PCommunicator._communicate is communicate


def test_pipeline_stages_are_refused_without_the_patch():
    """Building an mHC stage for pipeline parallelism is refused until the p2p patch is in place
    (a model built alone must not change Megatron as a side effect); the residual variant needs
    no patch."""
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    from mhc_megatron.megatron import MHCConfigError
    from mhc_megatron.megatron.model import check_pipeline_streams

    original = P2PCommunicator._communicate
    with pytest.raises(MHCConfigError, match="install_pipeline_streams"):
        check_pipeline_streams(
            mhc_config(pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
        )
    assert P2PCommunicator._communicate is original  # refusing changed nothing
    check_pipeline_streams(
        mhc_config(
            mhc_variant="residual", pipeline_model_parallel_size=2, pipeline_dtype=torch.float32
        )
    )


def test_first_decoder_layer_enters_the_streams():
    """The streams are entered by the model's first layer: a model of only later layers (a
    second pipeline stage) takes ``[s, b, n*C]``, the whole model takes the embedding's
    ``[s, b, C]``, and a first stage without layers is refused with what to change."""
    from types import SimpleNamespace

    from mhc_megatron.megatron import MHCConfigError
    from mhc_megatron.megatron.model import check_first_stage_has_layers

    model = build_model(mhc_config(mhc_num_streams=3))
    seen = []
    first = model.decoder.layers[0]
    hook = first.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        kwargs["hidden_states"].shape), with_kwargs=True)  # fmt: skip
    ids, pos = token_inputs()
    model(ids, pos, None)
    hook.remove()
    assert first.layer_number == 1 and seen[0][-1] == 32  # C, entered inside the layer
    assert [layer.layer_number for layer in model.decoder.layers] == [1, 2, 3]
    lone_embedding = SimpleNamespace(
        pre_process=True, post_process=False, decoder=SimpleNamespace(layers=[])
    )
    with pytest.raises(MHCConfigError, match="at least one layer"):
        check_first_stage_has_layers(lone_embedding)
