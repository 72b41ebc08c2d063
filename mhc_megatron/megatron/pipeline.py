"""Pipeline parallelism with n residual streams: the p2p wire shape is ``[s, b, n*C]``.

Megatron-Core 0.19.2 sizes every pipeline receive buffer as ``[s, b, config.hidden_size]``: the
non-interleaved schedule in ``schedules.get_tensor_shapes`` and the interleaved one inline in
``forward_backward_pipelining_with_interleaving``. Both hand that shape to
``P2PCommunicator._communicate``, which allocates the buffers, so one hook there covers both
schedules, forward activations and backward gradients alike. It widens the last dimension to
``n*C`` for communicators whose config is an mHC config with the streams on, and leaves every
other communicator (other models in the same process, the residual variant) untouched.

The alternative, ``config.variable_seq_lengths = True``, works without a hook but adds a
blocking shape handshake to every send and receive, and Megatron forbids it with the allgather
MoE dispatcher.
"""

import functools
import inspect

from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

from mhc_megatron.megatron.config import MHCTransformerConfig


def pipeline_tensor_shape(config, tensor_shape):
    """The shape a pipeline stage sends and receives, given the schedule's stock shape.

    Args:
        config: the model config the communicator was built with.
        tensor_shape: the schedule's shape ``(s', b, C)``; ``()`` or None when Megatron exchanges
            shapes at run time (variable_seq_lengths, MTP standalone).

    Returns:
        ``(s', b, n*C)`` for an mHC config with the streams on, else ``tensor_shape``.
    """
    if (
        not isinstance(config, MHCTransformerConfig)
        or not config.mhc_enabled
        or not tensor_shape
        or tensor_shape[-1] != config.hidden_size
    ):
        return tensor_shape
    widened = (*tuple(tensor_shape)[:-1], config.mhc_num_streams * config.hidden_size)
    return type(tensor_shape)(widened) if isinstance(tensor_shape, list) else widened


def communicate_with_stream_shapes(communicate):
    """``P2PCommunicator._communicate`` that sizes the buffers with :func:`pipeline_tensor_shape`.

    ``mhc_megatron.training.megatron_patches.install`` installs it for mHC runs with pipeline
    parallelism; :func:`stream_shapes_installed` says whether it is in place.

    Args:
        communicate: Megatron's ``P2PCommunicator._communicate``.

    Raises:
        RuntimeError: the installed Megatron-Core's ``P2PCommunicator._communicate`` no longer
            takes ``tensor_shape`` (the hook was written against 0.19.2).
    """
    if "tensor_shape" not in inspect.signature(communicate).parameters:
        raise RuntimeError(
            "P2PCommunicator._communicate has no tensor_shape argument in this Megatron-Core; "
            "the mHC pipeline hook targets megatron-core 0.19.2. Install that version, or run "
            "with --pipeline-model-parallel-size 1."
        )

    @functools.wraps(communicate)
    def communicate_streams(self, *args, tensor_shape, **kwargs):
        return communicate(
            self, *args, tensor_shape=pipeline_tensor_shape(self.config, tensor_shape), **kwargs
        )

    communicate_streams.mhc_stream_shapes = True
    return communicate_streams


def stream_shapes_installed() -> bool:
    """Whether pipeline stages exchange ``[s, b, n*C]`` (communicate_with_stream_shapes)."""
    return getattr(P2PCommunicator._communicate, "mhc_stream_shapes", False)
