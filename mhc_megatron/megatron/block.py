"""Leaving the n streams: the decoder's final norm with the collapse in front of it."""

import math

import torch

from mhc_megatron import ops
from mhc_megatron.megatron.config import MHCTransformerConfig
from mhc_megatron.megatron.site import KeepFP32Module


class MHCFinalNorm(KeepFP32Module):
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
