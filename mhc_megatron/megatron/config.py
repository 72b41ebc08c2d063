"""Megatron TransformerConfig with the mHC fields, validated when the model is built."""

import dataclasses
from dataclasses import dataclass
from typing import Literal

from megatron.core.transformer import MLATransformerConfig, TransformerConfig

from mhc_megatron.kernels import MAX_STREAMS as MAX_KERNEL_STREAMS
from mhc_megatron.kernels import unsupported_num_streams
from mhc_megatron.ops import MAX_LITE_STREAMS

VARIANTS = ("residual", "hc", "mhc", "mhc-lite")
INITS = ("paper", "residual")
COLLAPSES = ("head", "mean")
BACKENDS = ("torch", "triton", "auto")
# Streams beyond this make the per-site projection n^2 * n * C (n = 100 at C = 128: 130M
# parameters a site); the paper uses 4, and the fused kernels take n <= 8.
MAX_NUM_STREAMS = 16


class MHCConfigError(ValueError):
    """An mHC setting, or a Megatron setting that mHC cannot run with; the message says the fix."""


@dataclass
class MHCTransformerConfig(TransformerConfig):
    """TransformerConfig plus the mHC residual settings (docs/mhc-spec.md).

    ``hidden_size`` stays the width C of one stream: weights, norms and the MoE layer are sized
    by it, while the residual between layers is ``[s, b, n*C]``.
    """

    mhc_variant: Literal["residual", "hc", "mhc", "mhc-lite"] = "mhc"
    """Residual scheme: residual (plain pre-norm baseline), hc (Hyper-Connections, unconstrained),
    mhc (Sinkhorn-constrained H_res) or mhc-lite (H_res a softmax-weighted sum of the n!
    permutation matrices, exactly doubly stochastic; n <= 6)."""

    mhc_num_streams: int = 4
    """Number of residual streams n (the paper uses 4)."""

    mhc_sinkhorn_iters: int = 20
    """Sinkhorn-Knopp iterations for H_res (paper: 20)."""

    mhc_eps: float = 1e-6
    """eps of the RMS normalisation, of h_pre and of the Sinkhorn denominators."""

    mhc_gating_init: float = 0.01
    """Initial gating factors alpha_pre, alpha_post, alpha_res (paper: 0.01)."""

    mhc_init: Literal["paper", "residual"] = "paper"
    """Static-logit init: paper (all static logits 0) or residual (the model starts as the plain
    residual model: h_pre = 1/n, h_post = 1, H_res = I)."""

    mhc_collapse: Literal["head", "mean"] = "head"
    """How the n streams become one before the final norm: head (DeepSeek-V4's learned weights)
    or mean (Megatron-LM main)."""

    mhc_backend: Literal["torch", "triton", "auto"] = "auto"
    """Implementation of the mHC ops: torch (plain PyTorch, mhc_megatron.ops), triton (the fused
    kernels of mhc_megatron.kernels; CUDA, or Triton's interpreter with TRITON_INTERPRET=1) or
    auto (triton on CUDA when Triton is importable and n <= 8, torch otherwise). With
    --deterministic-mode the kernels' weight gradients are bitwise reproducible."""

    mhc_recompute: str = dataclasses.field(
        default="none",
        metadata={"argparse_meta": {"type": str, "nargs": "?", "const": "stage"}},
    )
    """Stream recompute (paper eq. 20): none; stage (what a bare --mhc-recompute selects: one
    block per pipeline stage); or a block length in layers. A block keeps its input streams
    [s, b, n*C] and each sublayer's branch output [s, b, C]; backward rebuilds the streams from
    them without re-running attention or the MLP."""

    mhc_diagnostics_interval: int = 0
    """Every this many iterations (0: never), record the coefficients of every site for one
    micro-batch and write the stability diagnostics to TensorBoard (mhc-stability/...): amax
    gains of each H_res and of the composite product up to each site (forward: largest row sum,
    backward: largest column sum), Sinkhorn row/column errors, mean h_pre and h_post
    (mhc_megatron/megatron/diagnostics.py)."""

    def __post_init__(self):
        """Checks the mHC fields, then Megatron's own, then the Megatron features mHC supports.

        Raises:
            MHCConfigError: an invalid mHC setting, or a Megatron feature the variant does not
                support; the message says what to change.
        """
        self._check_mhc_fields()
        if self.mhc_variant != "residual" and self.kv_channels is None:
            heads = self.num_attention_heads
            if heads and self.hidden_size % heads != 0:
                raise MHCConfigError(
                    f"hidden_size={self.hidden_size} is not a multiple of "
                    f"num_attention_heads={heads}: the mHC streams are hidden_size wide and the "
                    f"attention output would be {heads * (self.hidden_size // heads)} wide. "
                    "Choose a hidden size divisible by the number of heads, or pass --kv-channels."
                )
        super().__post_init__()
        if self.mhc_variant != "residual":
            self._check_megatron_features()

    @property
    def mhc_recompute_layers(self) -> int | None:
        """Layers per recompute block: None (off), 0 (the whole stage) or the block length."""
        if self.mhc_recompute == "none" or not self.mhc_enabled:
            return None
        return 0 if self.mhc_recompute == "stage" else int(self.mhc_recompute)

    @property
    def mhc_enabled(self) -> bool:
        """True when the residual is widened to n streams (every variant but residual)."""
        return self.mhc_variant != "residual"

    def _check_mhc_fields(self) -> None:
        kernel_problem = unsupported_num_streams(self.mhc_num_streams)
        checks = [
            (
                self.mhc_variant in VARIANTS,
                f"mhc_variant={self.mhc_variant!r} is unknown; use one "
                f"of {', '.join(VARIANTS)} (--mhc-variant)",
            ),
            (
                isinstance(self.mhc_num_streams, int)
                and 1 <= self.mhc_num_streams <= MAX_NUM_STREAMS,
                f"mhc_num_streams={self.mhc_num_streams} must be an integer from 1 to "
                f"{MAX_NUM_STREAMS} (--mhc-num-streams; the paper uses 4, the fused kernels "
                f"take up to {MAX_KERNEL_STREAMS}); each site's projection has n^3 * C weights",
            ),
            (
                self.mhc_variant != "mhc-lite" or self.mhc_num_streams <= MAX_LITE_STREAMS,
                f"mhc_variant='mhc-lite' mixes n! permutation matrices; "
                f"mhc_num_streams={self.mhc_num_streams} is above {MAX_LITE_STREAMS} "
                "(--mhc-num-streams), or use --mhc-variant mhc",
            ),
            (
                self.mhc_sinkhorn_iters >= 1,
                f"mhc_sinkhorn_iters={self.mhc_sinkhorn_iters} must be >= 1 (--mhc-sinkhorn-iters)",
            ),
            (self.mhc_eps > 0, f"mhc_eps={self.mhc_eps} must be > 0 (--mhc-eps; default 1e-6)"),
            (
                self.mhc_diagnostics_interval >= 0,
                f"mhc_diagnostics_interval={self.mhc_diagnostics_interval} must be >= 0 "
                "(--mhc-diagnostics-interval; 0 turns the diagnostics off)",
            ),
            (
                self.mhc_gating_init >= 0,
                f"mhc_gating_init={self.mhc_gating_init} must be >= 0 (--mhc-gating-init)",
            ),
            (
                self.mhc_init in INITS,
                f"mhc_init={self.mhc_init!r} is unknown; "
                f"use one of {', '.join(INITS)} (--mhc-init)",
            ),
            (
                self.mhc_collapse in COLLAPSES,
                f"mhc_collapse={self.mhc_collapse!r} is unknown; "
                f"use one of {', '.join(COLLAPSES)} (--mhc-collapse)",
            ),
            (
                self.mhc_backend in BACKENDS,
                f"mhc_backend={self.mhc_backend!r} is unknown; use one "
                f"of {', '.join(BACKENDS)} (--mhc-backend)",
            ),
            (
                self.mhc_recompute in ("none", "stage")
                or (self.mhc_recompute.isdigit() and int(self.mhc_recompute) >= 1),
                f"mhc_recompute={self.mhc_recompute!r} is unknown; use none, stage or a block "
                "length in layers >= 1 (--mhc-recompute [stage|N])",
            ),
            (
                self.mhc_backend != "triton" or kernel_problem is None,
                kernel_problem,
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise MHCConfigError(message)

    def _check_megatron_features(self) -> None:
        """Megatron features whose code paths bypass or mis-size the n-stream residual."""
        refused = [
            (bool(self.mtp_num_layers), "multi-token prediction; drop --mtp-num-layers"),
            (
                self.fp32_residual_connection,
                "--fp32-residual-connection (the mHC streams keep the activation dtype and the mix "
                "runs in fp32 already); drop the flag",
            ),
            (
                self.fused_residual_rmsnorm,
                "fused residual RMSNorm (it returns the residual it adds, which mHC replaces); "
                "drop --fused-residual-rmsnorm",
            ),
            (
                self.cuda_graph_impl != "none",
                "CUDA graphs (their static inputs are hidden_size wide and TE partial graphs "
                "call the MLP without the mHC site); use --cuda-graph-impl none",
            ),
            (
                self.overlap_moe_expert_parallel_comm,
                "--overlap-moe-expert-parallel-comm (its fine-grained callables call mlp_bda with "
                "the residual directly); drop the flag",
            ),
            (
                self.fine_grained_activation_offloading or self.cpu_offloading,
                "activation offloading (it releases the residual mHC still needs); drop the flag",
            ),
            (
                self.inference_fuse_tp_communication,
                "inference_fuse_tp_communication (it adds the residual inside attention)",
            ),
        ]
        for bad, what in refused:
            if bad:
                raise MHCConfigError(f"mhc_variant={self.mhc_variant!r} does not support {what}.")


@dataclass
class MHCMLATransformerConfig(MHCTransformerConfig, MLATransformerConfig):
    """MHCTransformerConfig for Multi-Latent Attention models (--multi-latent-attention)."""


def mhc_fields() -> list[dataclasses.Field]:
    """The dataclass fields MHCTransformerConfig adds to TransformerConfig."""
    base = {f.name for f in dataclasses.fields(TransformerConfig)}
    return [f for f in dataclasses.fields(MHCTransformerConfig) if f.name not in base]


def to_mhc_config(config: TransformerConfig, **mhc_settings) -> MHCTransformerConfig:
    """Rebuilds a (MLA)TransformerConfig as its mHC subclass with the given mhc_* settings.

    ``core_transformer_config_from_args`` swaps in MLATransformerConfig for
    --multi-latent-attention whatever class it is given, so the mHC class is chosen here from
    the config it returned.
    """
    cls = (
        MHCMLATransformerConfig
        if isinstance(config, MLATransformerConfig)
        else (MHCTransformerConfig)
    )
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    values.update(mhc_settings)
    return cls(**values)
