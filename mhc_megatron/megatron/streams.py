"""The n residual streams through a Megatron GPT decoder, start to end (spec sections 2-4).

Megatron's GPTModel and TransformerBlock are used as they are; the streams live entirely in the
modules of the decoder spec (``specs.py``), so the same model runs with or without pipeline
stages, virtual stages and recompute:

1. **Enter** (the model's first layer, on the first pipeline stage): ``MHCTransformerLayer``
   with ``layer_number == 1`` copies the embedding output ``[s, b, C]`` into n streams
   ``[s, b, n*C]`` with :func:`enter_streams`.
2. **Layers**: every layer maps ``[s, b, n*C] -> [s, b, n*C]`` through two mHC sites, attention
   and MLP/MoE (``layer.py``, ``site.py``). With ``--mhc-recompute`` consecutive layers of a
   stage form a ``RecomputeBlock`` (``recompute.py``); TransformerBlock hands a layer nothing
   but the previous layer's output, so the block travels as an attribute of that tensor.
3. **Between pipeline stages** the wire carries ``[s, b, n*C]`` (``pipeline.py``; the p2p
   buffer patch is installed by ``mhc_megatron.training.megatron_patches``). A recompute block
   never crosses a stage: a received tensor carries no block.
4. **Leave** (the last stage): :class:`CollapseStreamsNorm` sits in the decoder's final-norm
   slot, which Megatron builds exactly there, and collapses ``[s, b, n*C] -> [s, b, C]`` before
   the stock norm; the output layer sees a plain residual stream.
"""

import math

import torch

from mhc_megatron import ops
from mhc_megatron.megatron.config import MHCTransformerConfig
from mhc_megatron.megatron.site import KeepFP32Module


def enter_streams(hidden_states: torch.Tensor, num_streams: int) -> torch.Tensor:
    """The embedding output copied into the n streams (spec section 2).

    Args:
        hidden_states: ``[s, b, C]`` the embedding output (s is s/tp under sequence parallelism).
        num_streams: n.

    Returns:
        ``[s, b, n*C]``, stream i holding a copy of the input.
    """
    return ops.expand_streams(hidden_states, num_streams).flatten(-2)


class CollapseStreamsNorm(KeepFP32Module):
    """Collapse ``[s, b, n*C] -> [s, b, C]``, then the stock final norm.

    Used as the decoder block's ``layer_norm`` slot, so it runs exactly where Megatron builds the
    final norm (the last pipeline stage) with no TransformerBlock subclass. The learned head's
    parameters live here, outside ``layers``, which keeps the layers' checkpoint keys stackable.

    Args:
        config: MHCTransformerConfig (variant hc or mhc).
        hidden_size: C.
        eps: the norm's eps.
        norm_cls: the stock norm class or factory (LNImpl, TENorm) to build with
            ``(config=, hidden_size=, eps=)``.
    """

    def __init__(self, config: MHCTransformerConfig, hidden_size: int, eps: float, norm_cls):
        super().__init__(config=config)
        self.norm = norm_cls(config=config, hidden_size=hidden_size, eps=eps)
        n = config.mhc_num_streams
        if config.mhc_collapse == "head":
            # Default device, as the sites' parameters (site.py).
            self.head_fn = torch.nn.Parameter(torch.empty(n, n * hidden_size))
            # residual init: w = 1/n, the mean; paper: logits 0 like the sites' static logits.
            base = math.log(1 / (n - 1)) if config.mhc_init == "residual" and n > 1 else 0.0
            self.head_base = torch.nn.Parameter(torch.full((n,), base))
            self.head_scale = torch.nn.Parameter(torch.full((1,), float(config.mhc_gating_init)))
            if config.perform_initialization:
                config.init_method(self.head_fn)
            for param in (self.head_fn, self.head_base, self.head_scale):
                param.sequence_parallel = config.sequence_parallel

    def forward(self, hidden_states: torch.Tensor):
        """Args: hidden_states: ``[s, b, n*C]``. Returns: the norm's output on ``[s, b, C]``."""
        x = hidden_states.unflatten(-1, (self.config.mhc_num_streams, self.config.hidden_size))
        if self.config.mhc_collapse == "head":
            collapsed = ops.collapse_head(
                x, self.head_fn, self.head_base, self.head_scale, eps=self.config.mhc_eps
            )
        else:
            collapsed = ops.collapse_mean(x)
        return self.norm(collapsed)
