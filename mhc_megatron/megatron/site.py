"""The mHC site: the parameters and coefficients of one attention or MLP/MoE residual."""

import math

import torch
from megatron.core.transformer.module import MegatronModule

from mhc_megatron import ops
from mhc_megatron.megatron.backend import site_ops
from mhc_megatron.megatron.config import MHCTransformerConfig
from mhc_megatron.megatron.diagnostics import NONFINITE_SITES, RECORDER

# Off-diagonal static res logit of the residual-equivalent init: exp(-12) * (n - 1) < 1e-4 for
# n <= 8, so H_res is the identity to within the spec's 1e-4.
RESIDUAL_INIT_OFF_DIAGONAL = -12.0
RESIDUAL_INIT_LITE_OTHERS = -18.0


def res_rows(variant: str, n: int) -> int:
    """Rows of ``fn`` (and entries of ``base``) for H_res.

    ``n*n`` logits, or one per permutation (``n!``) for mhc-lite.
    """
    return math.factorial(n) if variant == "mhc-lite" else n * n


def static_logit_init(variant: str, init: str, n: int, layer_index: int) -> torch.Tensor:
    """Initial ``base [2n + res_rows]`` (order ``[pre | post | res]``) of a site.

    Args:
        variant: ``hc``, ``mhc`` or ``mhc-lite``.
        init: ``paper`` or ``residual``.
        n: number of streams.
        layer_index: 0-based global index of the layer (HC's paper init reads stream
            ``layer_index mod n``).

    Returns:
        ``[2n + res_rows(variant, n)]`` fp32.
    """
    pre, post, res = torch.zeros(n), torch.zeros(n), torch.zeros(n, n)
    if variant in ("mhc", "mhc-lite"):
        if variant == "mhc-lite":  # one logit per permutation, the identity first
            res = torch.zeros(math.factorial(n))
        if init == "residual":
            # h_pre = 1/n (for n = 1, sigmoid(13.8) = 1 - 1e-6), h_post = 2*sigmoid(0) = 1,
            # H_res = I.
            pre.fill_(math.log(1 / (n - 1)) if n > 1 else 13.8)
            if variant == "mhc-lite":
                # Weight of the other n! - 1 permutations: 719 * exp(-18) < 1e-4 for n <= 6.
                res.fill_(RESIDUAL_INIT_LITE_OTHERS)[0] = 0.0
            else:
                res.fill_(RESIDUAL_INIT_OFF_DIAGONAL).fill_diagonal_(0.0)
        # paper: the paper specifies only alpha; all static logits start at 0 (h_pre = 1/2,
        # h_post = 1, H_res = 1/n everywhere: for mhc-lite the uniform mix of permutations).
    else:  # hc: h = alpha * tanh(.) + b, so b is the value itself.
        post.fill_(1.0)
        res = torch.eye(n)
        if init == "residual":
            pre.fill_(1.0 / n)
        else:  # HC paper: the branch reads stream (layer mod n).
            pre[layer_index % n] = 1.0
    return torch.cat([pre, post, res.flatten()])


class KeepFP32Module(MegatronModule):
    """A module whose fp32 parameters stay fp32 when the model is cast to bf16/fp16.

    Megatron's Float16Module casts the whole model; the spec keeps mHC parameters in fp32 (the
    coefficients are computed in fp32 from logits where bf16's 8 bits would be coarse).
    """

    def _apply(self, fn, recurse=True):
        def keep_fp32(t):
            out = fn(t)
            if t.dtype == torch.float32 and out.dtype in (torch.float16, torch.bfloat16):
                return out.float()
            return out

        return super()._apply(keep_fp32, recurse)


class MHCSite(KeepFP32Module):
    """Parameters and coefficient computation of one site (spec section 1).

    Parameters (fp32): ``fn [n*n + 2n, n*C]``, ``base [n*n + 2n]``, ``scale [3]`` (mhc-lite:
    ``n!`` res rows instead of ``n*n``).

    Args:
        config: the model's MHCTransformerConfig (variant hc, mhc or mhc-lite).
        layer_index: 0-based global layer index (for HC's paper init).
        kind: ``attention`` or ``mlp``, the branch the site wraps; names it in the diagnostics.
    """

    def __init__(self, config: MHCTransformerConfig, layer_index: int, kind: str = "attention"):
        super().__init__(config=config)
        self.layer_index, self.kind = layer_index, kind  # names it in the diagnostics
        n, c = config.mhc_num_streams, config.hidden_size
        self.num_streams = n
        # On the default device (CPU, or an ambient torch.device such as meta when counting
        # parameters); Megatron's get_model moves the model to the GPU.
        self.fn = torch.nn.Parameter(torch.empty(2 * n + res_rows(config.mhc_variant, n), n * c))
        self.base = torch.nn.Parameter(
            static_logit_init(config.mhc_variant, config.mhc_init, n, layer_index)
        )
        self.scale = torch.nn.Parameter(torch.full((3,), float(config.mhc_gating_init)))
        if config.perform_initialization:
            config.init_method(self.fn)
        for param in self.parameters():
            # Replicated over TP; under sequence parallelism each TP rank sees other tokens, so
            # finalize_model_grads must sum these gradients over the TP group.
            param.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Coefficients of every token.

        Args:
            x: ``[s, b, n, C]`` streams.

        Returns:
            ``(h_pre [s, b, n], h_post [s, b, n], h_res [s, b, n, n])`` fp32.
        """
        return self.coefficients(x, self.fn, self.base, self.scale)

    def coefficients(self, x, fn, base, scale):
        """The coefficients with the parameters passed in.

        The stream recompute passes detached copies. Shapes as :meth:`forward`.
        """
        if self.config.mhc_variant == "hc":
            # The fused coefficients kernel is mHC's (Sinkhorn); HC, a baseline for stability
            # studies, keeps the torch ops here and uses the fused mixes in the layer.
            coefficients = ops.hc_coefficients(x, fn, base, scale, eps=self.config.mhc_eps)
        elif self.config.mhc_variant == "mhc-lite":
            # A softmax and one small matmul, no iterations: plain torch (the fused mixes still
            # serve it in the layer).
            coefficients = ops.mhc_lite_coefficients(x, fn, base, scale, eps=self.config.mhc_eps)
        else:
            coefficients = site_ops(self.config, x.device).mhc_coefficients(
                x, fn, base, scale, iters=self.config.mhc_sinkhorn_iters, eps=self.config.mhc_eps
            )
        self.observe(*coefficients)
        return coefficients

    def fused_enter(self, x: torch.Tensor, fused_site, after=None):
        """Coefficients and branch input on the fused site kernels (variant mhc).

        Args:
            x: ``[s, b, n, C]`` streams.
            fused_site: :mod:`mhc_megatron.kernels.site`.
            after: the link of the site whose exit gave ``x``, to chain their backward passes.

        Returns:
            ``(u [s, b, C], h_post [s, b, n], h_res [s, b, n, n], link)``; ``link`` goes to
            ``fused_site.mhc_site_exit``.
        """
        u, h_pre, h_post, h_res, link = fused_site.mhc_site_enter(
            x, self.fn, self.base, self.scale, iters=self.config.mhc_sinkhorn_iters,
            eps=self.config.mhc_eps, deterministic=self.config.deterministic_mode, after=after,
        )  # fmt: skip
        self.observe(h_pre, h_post, h_res)
        return u, h_post, h_res, link

    def observe(self, h_pre, h_post, h_res) -> None:
        """Hands the coefficients to the diagnostics (no-ops unless armed or guarded)."""
        RECORDER.offer(self.layer_index + 1, self.kind, h_pre, h_post, h_res)
        NONFINITE_SITES.note(self.layer_index + 1, self.kind, h_pre, h_post, h_res)
