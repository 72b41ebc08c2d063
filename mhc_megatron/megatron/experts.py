"""MoE experts on torch's grouped GEMM, for runs without TransformerEngine.

Megatron-Core 0.19.2 has a grouped-GEMM expert module only on TransformerEngine
(``TEGroupedMLP``); its local spec runs ``SequentialMLP``, one expert after another, even with
``--moe-grouped-gemm``. :class:`GroupedGemmMLP` is ``SequentialMLP`` with another forward: the
same parameters (one ``MLP`` per local expert, built and initialised in the same order), the
same checkpoint keys and layouts (its ``sharded_state_dict`` is SequentialMLP's), and the same
arithmetic, but the experts' two projections run as one ``torch.nn.functional.grouped_mm``
each over all local tokens. The activation, the routing probabilities and the biases go through
Megatron's own ``MLP.forward`` code, so every activation option behaves as in SequentialMLP.

Experts exchange no tensor-parallel traffic inside the module (the token dispatcher does it;
Megatron's ``explicit_expert_comm``), so expert parallelism and expert tensor parallelism need
nothing here: each rank's local experts hold their local shards.
"""

import functools
import types

import torch
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.experts import SequentialMLP

# grouped_mm reads rows whose strides are multiples of 16 bytes.
_ALIGN_BYTES = 16


def grouped_mm_available() -> bool:
    """Whether this torch has ``torch.nn.functional.grouped_mm``."""
    return hasattr(torch.nn.functional, "grouped_mm")


def _contiguous(grad: torch.Tensor) -> torch.Tensor:
    """grouped_mm's backward refuses expanded gradients (a ``sum()`` loss gives stride 0)."""
    return grad.contiguous()


class _GroupedLinear(torch.nn.Module):
    """One projection of every local expert as one grouped GEMM, with a Megatron linear's
    ``(output, bias)`` return. Not registered in the module tree: it owns nothing, it reads the
    experts' own weights."""

    def __init__(self, experts: "GroupedGemmMLP", name: str):
        super().__init__()
        object.__setattr__(self, "experts", experts)  # not a submodule: no second state dict
        self.linear_name = name
        self.offsets: torch.Tensor | None = None
        self.expert_of_row: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None

    def _stacked(self, attribute: str) -> torch.Tensor | None:
        tensors = [
            getattr(getattr(expert, self.linear_name), attribute, None)
            for expert in self.experts.local_experts
        ]
        return None if tensors[0] is None else torch.stack(tensors)

    def forward(self, x: torch.Tensor):
        """``x: [tokens, in]`` (rows grouped by expert) -> ``([tokens, out], bias)``.

        fc1 returns its bias per row (``[tokens, out]``), for MLP.forward to add before the
        activation as its linear's ``skip_bias_add`` does; fc2 adds ``bias * probs`` itself
        (MLP.forward's expert path broadcasts a ``[out]`` bias only).
        """
        weight = self._stacked("weight")  # [E, out, in]
        out = torch.nn.functional.grouped_mm(x, weight.transpose(1, 2), offs=self.offsets)
        if out.requires_grad:
            out.register_hook(_contiguous)
        bias = self._stacked("bias")
        if bias is None:
            return out, None
        bias = bias[self.expert_of_row]
        if self.linear_name == "linear_fc2":
            return out + bias * self.scale.unsqueeze(-1), None
        return out, bias


class GroupedGemmMLP(SequentialMLP):
    """SequentialMLP's experts run as two grouped GEMMs (module docstring).

    Falls back to SequentialMLP's loop where grouped_mm cannot run: FP8/FP4, a torch without
    ``grouped_mm``, CUDA tensors other than bf16, or rows not a multiple of 16 bytes. The
    numbers are the same either way.
    """

    def __init__(self, num_local_experts, config, submodules, pg_collection=None, name=None):
        super().__init__(num_local_experts, config, submodules, pg_collection, name)
        # Plain attributes, not submodules: the state dict stays SequentialMLP's.
        object.__setattr__(self, "_fc1", _GroupedLinear(self, "linear_fc1"))
        object.__setattr__(self, "_fc2", _GroupedLinear(self, "linear_fc2"))

    def grouped(self, x: torch.Tensor) -> bool:
        """Whether the grouped path takes ``x``."""
        if self.config.fp8 or self.config.fp4 or not grouped_mm_available():
            return False
        if x.is_cuda and x.dtype != torch.bfloat16:
            return False
        fc1, fc2 = self.local_experts[0].linear_fc1.weight, self.local_experts[0].linear_fc2.weight
        rows = (x.shape[-1], fc1.shape[0], fc2.shape[1], fc2.shape[0])
        return all(r * x.element_size() % _ALIGN_BYTES == 0 for r in rows)

    def forward(
        self,
        permuted_local_hidden_states: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        permuted_probs: torch.Tensor,
    ):
        """``([tokens, H], None)`` from the tokens of the local experts, grouped by expert.

        Args:
            permuted_local_hidden_states: ``[tokens, H]``, rows of expert 0 first, then 1, ...
            tokens_per_expert: ``[num_local_experts]`` rows of each expert (any device).
            permuted_probs: ``[tokens]`` routing probabilities.
        """
        x, probs = permuted_local_hidden_states, permuted_probs
        if not self.grouped(x):
            return super().forward(x, tokens_per_expert, probs)
        if self.config.moe_apply_probs_on_input:  # as SequentialMLP
            assert self.config.moe_router_topk == 1, (
                "`moe_apply_probs_on_input` only works with `moe_router_topk`=1."
            )
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        counts = tokens_per_expert.to(device=x.device, dtype=torch.int64)
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        expert_of_row = None  # only biases need each row's expert
        if self.config.add_bias_linear:
            expert_of_row = torch.repeat_interleave(
                torch.arange(len(counts), device=x.device), counts, output_size=x.shape[0]
            )
        for linear in (self._fc1, self._fc2):
            linear.offsets, linear.expert_of_row, linear.scale = offsets, expert_of_row, probs
        try:
            # Megatron's MLP.forward on the grouped linears: its activation, probs and bias
            # handling, for all experts at once (it reads only these four attributes).
            first = self.local_experts[0]
            view = types.SimpleNamespace(
                config=first.config, activation_func=first.activation_func,
                linear_fc1=self._fc1, linear_fc2=self._fc2,
            )  # fmt: skip
            output, _ = MLP.forward(view, x, per_token_scale=probs)
        finally:
            for linear in (self._fc1, self._fc2):
                linear.offsets = linear.expert_of_row = linear.scale = None
        return output, None


def use_grouped_gemm_experts(layer_spec) -> bool:
    """Swaps ``SequentialMLP`` for :class:`GroupedGemmMLP` in a local layer spec's MoE experts
    (in place; the caller copies shared specs). Returns whether the spec had such experts."""
    mlp = getattr(layer_spec.submodules, "mlp", None)
    moe = getattr(mlp, "keywords", {}).get("submodules")
    experts = getattr(moe, "experts", None)
    if getattr(experts, "func", None) is not SequentialMLP:
        return False
    moe.experts = functools.partial(GroupedGemmMLP, *experts.args, **experts.keywords)
    return True
