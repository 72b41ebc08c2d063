"""A TransformerLayer whose attention and MLP/MoE residuals are both mHC sites."""

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor

from mhc_megatron.megatron.backend import site_ops
from mhc_megatron.megatron.recompute import (
    RECOMPUTE_BLOCK_ATTRIBUTE,
    RecomputeBlock,
    enter_site,
    exit_site,
)
from mhc_megatron.megatron.site import MHCSite
from mhc_megatron.megatron.streams import enter_streams

# On a layer's output streams: the fused-site link of its last exit, so the next layer's first
# site chains its backward to it (kernels.site). Lost, as it should be, across pipeline stages.
LINK_ATTRIBUTE = "_mhc_site_link"


def get_bias_dropout(training: bool, fused: bool):
    """Replacement for Megatron's ``get_bias_dropout_add`` that does not add the residual.

    The stock layer computes ``residual + dropout(out + bias)`` in its ``*_bda`` slots; in the
    mHC layer the site's post+residual mix takes the residual's place, so the slot returns
    ``dropout(out + bias)`` alone. A plain function, so ``build_module`` hands it over unchanged.

    Args:
        training: apply dropout.
        fused: ignored (Megatron's fused variant also adds the residual).
    """
    del fused

    def bias_dropout(x_with_bias, residual, prob):
        del residual
        out, bias = x_with_bias
        if bias is not None:
            out = out + bias
        return torch.nn.functional.dropout(out, p=prob, training=training)

    return bias_dropout


class MHCTransformerLayer(TransformerLayer):
    """Megatron's TransformerLayer with both residual adds replaced by mHC sites.

    Per site (spec eq. 3): coefficients from the streams, branch input
    ``u = sum_j h_pre[j] x[j]``, the stock branch (its own pre-norm, attention or MLP/MoE, bias
    and dropout), then ``x_next[i] = sum_j H_res[i, j] x[j] + h_post[i] y``. Everything inside
    the branches (TE-fused norms, selective recompute, MoE dispatch, TP/SP) is Megatron's own:
    this class only wraps ``_forward_attention`` and ``_forward_mlp``.

    Same constructor as ``TransformerLayer``; it adds the layer's two sites (attention and MLP).
    """

    def __init__(self, config, submodules, layer_number: int = 1, *args, **kwargs):
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        layer_index = self.layer_number - 1
        self.self_attention_hyper_connection = MHCSite(config, layer_index, "attention")
        self.mlp_hyper_connection = MHCSite(config, layer_index, "mlp")

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        """One layer on the n-stream residual.

        Args:
            hidden_states: ``[s, b, n*C]`` streams (s is s/tp under sequence parallelism); for
                the model's first layer the embedding output ``[s, b, C]``, which enters the
                streams here (streams.py).
            **kwargs: what TransformerBlock passes to every layer (attention_mask,
                rotary_pos_emb, inference_context, packed_seq_params, padding_mask, ...).

        Returns:
            ``([s, b, n*C] new streams, context)``.
        """
        n, c = self.config.mhc_num_streams, self.config.hidden_size
        if self.layer_number == 1:
            hidden_states = enter_streams(hidden_states, n)
        x = hidden_states.unflatten(-1, (n, c))
        mix = site_ops(self.config, x.device)  # torch ops or fused kernels (--mhc-backend)
        recompute_block = self._recompute_block(hidden_states, x, mix)

        previous = getattr(hidden_states, LINK_ATTRIBUTE, None)
        site = self.self_attention_hyper_connection
        u, h_post, h_res, handle = self._enter(recompute_block, site, x, mix, previous)
        attention_out, context = self._forward_attention(u, **kwargs)
        x = self._exit(recompute_block, mix, x, attention_out, h_post, h_res, handle)

        site = self.mlp_hyper_connection
        u, h_post, h_res, handle = self._enter(recompute_block, site, x, mix, handle)
        mlp_out = self._forward_mlp(
            u,
            kwargs.get("inference_context"),
            padding_mask=kwargs.get("padding_mask"),
            packed_seq_params=kwargs.get("packed_seq_params"),
        )
        x = self._exit(recompute_block, mix, x, mlp_out, h_post, h_res, handle)

        output = make_viewless_tensor(x.flatten(-2), requires_grad=True, keep_graph=True)
        if recompute_block is not None:
            # The next layer continues this block (TransformerBlock hands it this tensor).
            setattr(output, RECOMPUTE_BLOCK_ATTRIBUTE, recompute_block)
        elif mix.fused_site is not None:
            setattr(output, LINK_ATTRIBUTE, handle)
        return output, context

    def _recompute_block(self, hidden_states, x, mix) -> RecomputeBlock | None:
        """The recompute block this layer belongs to (None with --mhc-recompute none).

        A layer whose input carries no block (the first of a pipeline stage or virtual chunk)
        starts one, and so does a layer after a full block of ``--mhc-recompute N`` layers.
        """
        layers = self.config.mhc_recompute_layers
        if layers is None:
            return None
        block = getattr(hidden_states, RECOMPUTE_BLOCK_ATTRIBUTE, None)
        if block is None or (layers and block.layers >= layers):
            block = RecomputeBlock(x, mix.mhc_post_res, mix.fused_site)
        block.layers += 1
        return block

    @staticmethod
    def _enter(block, site, x, mix, previous=None):
        """``(u [s, b, C], h_post, h_res, handle)``: the site's coefficients and branch input.

        ``handle`` (what ``_exit`` needs besides) is the recompute block's site index, the fused
        site's link, or None. ``previous``: the fused-site link of the site whose exit gave
        ``x`` (their backward passes chain), or None.
        """
        if block is not None:
            return enter_site(block, site, x, mix.mhc_pre)
        if mix.fused_site is not None:
            return site.fused_enter(x, mix.fused_site, after=previous)
        h_pre, h_post, h_res = site(x)
        return mix.mhc_pre(x, h_pre), h_post, h_res, None

    @staticmethod
    def _exit(block, mix, x, y, h_post, h_res, handle):
        """``[s, b, n, C]`` new streams from the branch output ``y [s, b, C]``."""
        if block is not None:
            return exit_site(block, x, y, h_post, h_res, handle)
        if mix.fused_site is not None:
            return mix.fused_site.mhc_site_exit(x, y, h_post, h_res, handle)
        return mix.mhc_post_res(x, y, h_post, h_res)
