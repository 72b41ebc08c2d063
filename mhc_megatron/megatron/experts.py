"""MoE experts on torch's grouped GEMM, for runs without TransformerEngine.

Megatron-Core 0.19.2 has a grouped-GEMM expert module only on TransformerEngine
(``TEGroupedMLP``); its local spec runs ``SequentialMLP``, one expert after another, even with
``--moe-grouped-gemm``. :class:`GroupedGemmMLP` runs the local experts' two projections as one
``torch.nn.functional.grouped_mm`` each over all local tokens:

- **Parameters**: each projection is one parameter stacked over the local experts
  (``linear_fc1.weight: [E, out, in]``), so the GEMM reads the weights where they live: no
  per-step stacking copy, and no second copy of every expert weight held for the backward.
  They are initialised by building Megatron's ``SequentialMLP`` and stacking its experts, so a
  run starts from the same weights either way.
- **Checkpoints**: ``sharded_state_dict`` describes the stacked tensors with SequentialMLP's keys,
  global shapes and offsets (the expert axis is a real axis of the local tensor), so a torch_dist
  checkpoint written by one module loads into the other, at any expert-parallel size. A plain
  ``state_dict`` of a SequentialMLP also loads (its per-expert keys are stacked on the way in).
- **Arithmetic**: the activation, the routing probabilities and the biases go through Megatron's
  own ``MLP.forward`` code, so every activation option behaves as in SequentialMLP, and
  ``--recompute-modules moe_act`` recomputes the activation as TEGroupedMLP does.

Experts exchange no tensor-parallel traffic inside the module (the token dispatcher does it;
Megatron's ``explicit_expert_comm``), so expert parallelism and expert tensor parallelism need
nothing here: each rank's stacked parameters hold its local experts' local shards.
"""

import functools
import logging
import types

import torch
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_object_for_checkpoint,
)

# grouped_mm reads rows whose strides are multiples of 16 bytes.
_ALIGN_BYTES = 16
_LINEARS = ("linear_fc1", "linear_fc2")
logger = logging.getLogger(__name__)


def grouped_mm_available() -> bool:
    """Whether this torch has ``torch.nn.functional.grouped_mm``."""
    return hasattr(torch.nn.functional, "grouped_mm")


def _contiguous(grad: torch.Tensor) -> torch.Tensor:
    """grouped_mm's backward refuses expanded gradients (a ``sum()`` loss gives stride 0)."""
    return grad.contiguous()


def stack_sequential_state(state_dict: dict, prefix: str, num_local_experts: int) -> None:
    """Rewrites a SequentialMLP state dict into GroupedGemmMLP's, in place.

    ``{prefix}local_experts.{i}.linear_fc1.weight`` for ``i < E`` become one
    ``{prefix}linear_fc1.weight: [E, out, in]`` (biases ``[E, out]`` likewise); the experts'
    ``_extra_state`` entries become a list under ``{prefix}linear_fc1._extra_state``. A state
    dict without the per-expert keys is left as it is.
    """
    for linear in _LINEARS:
        for name in ("weight", "bias", "_extra_state"):
            keys = [f"{prefix}local_experts.{i}.{linear}.{name}" for i in range(num_local_experts)]
            if keys[0] not in state_dict:
                continue
            missing = [key for key in keys if key not in state_dict]
            if missing:
                raise KeyError(
                    f"{missing[0]} is missing: the state dict holds fewer local experts than "
                    f"this module's {num_local_experts} (same --num-experts and "
                    "--expert-model-parallel-size as the run that wrote it?)"
                )
            values = [state_dict.pop(key) for key in keys]
            stacked = values if name == "_extra_state" else torch.stack(values)
            state_dict[f"{prefix}{linear}.{name}"] = stacked


class GroupedLinear(torch.nn.Module):
    """One projection of every local expert: ``weight: [E, out, in]``, ``bias: [E, out]``.

    Args:
        linears: the ``E`` per-expert Megatron linears (ColumnParallelLinear for fc1,
            RowParallelLinear for fc2) whose weights, biases and parameter attributes it takes.
        tp_axis: the weight's tensor-parallel axis in the stacked layout (1 for fc1's output
            rows, 2 for fc2's input columns).
    """

    def __init__(self, linears: list[torch.nn.Module], tp_axis: int):
        super().__init__()
        self.tp_axis = tp_axis
        self.weight = self._stacked([linear.weight for linear in linears])
        biases = [getattr(linear, "bias", None) for linear in linears]
        self.bias = None if biases[0] is None else self._stacked(biases)

    @staticmethod
    def _stacked(params: list[torch.nn.Parameter]) -> torch.nn.Parameter:
        stacked = torch.nn.Parameter(torch.stack([p.detach() for p in params]))
        # Megatron's tags (tensor_model_parallel, allreduce, sequence_parallel, ...) say how
        # DDP, the optimizer and gradient clipping treat the parameter; they hold for the stack.
        for name, value in vars(params[0]).items():
            setattr(stacked, name, value + 1 if name == "partition_dim" else value)
        return stacked

    def bias_tp_axis(self) -> int | None:
        """fc1's bias is split over tensor parallelism with its rows; fc2's is whole."""
        return 1 if self.tp_axis == 1 else None

    def takes_grouped_mm(self, x: torch.Tensor) -> bool:
        """Whether ``grouped_mm`` can multiply ``x`` by this weight (else a loop over experts)."""
        if not grouped_mm_available() or (x.is_cuda and x.dtype != torch.bfloat16):
            return False  # torch's CUDA grouped GEMM is bf16-only
        rows = (self.weight.shape[1], self.weight.shape[2])
        return all(r * x.element_size() % _ALIGN_BYTES == 0 for r in rows)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, expert_of_row: torch.Tensor | None):
        """``x: [rows, in]`` grouped by expert -> ``([rows, out], bias per row [rows, out])``.

        Args:
            x: ``[rows, in]``, expert 0's rows first.
            offsets: ``[E]`` int32, the end row of each expert (cumulative counts).
            expert_of_row: ``[rows]`` expert index of each row, needed only with a bias.
        """
        if self.takes_grouped_mm(x):
            out = torch.nn.functional.grouped_mm(x, self.weight.transpose(1, 2), offs=offsets)
            if out.requires_grad:
                out.register_hook(_contiguous)
        else:
            counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
            # unbind's backward stacks the experts' gradients once (indexing would add E
            # full-size zero gradients).
            pieces = zip(x.split(counts), self.weight.unbind(0), strict=True)
            out = torch.cat([rows @ weight.t() for rows, weight in pieces])
        bias = None if self.bias is None else self.bias[expert_of_row]
        return out, bias

    def get_extra_state(self) -> None:
        """Megatron's local linears keep an empty ``_extra_state`` (TE compatibility); so do we."""
        return None

    def set_extra_state(self, state) -> None:
        """Accepts the experts' (empty) extra states, one or a list."""


class _ReturnsInput(torch.nn.Module):
    """A stand-in linear for ``MLP.forward``: returns its input and a given bias."""

    def __init__(self, bias: torch.Tensor | None):
        super().__init__()
        self.given_bias = bias

    def forward(self, x: torch.Tensor):
        """``x -> (x, bias)``."""
        return x, self.given_bias


class GroupedGemmMLP(MegatronModule):
    """The local experts as two grouped GEMMs over stacked weights (module docstring).

    Same constructor as Megatron's ``SequentialMLP``, which it builds once to take its
    initialised weights and configuration.
    """

    _warned_loop = False

    def __init__(self, num_local_experts, config, submodules, pg_collection=None, name=None):
        if config.fp8 or config.fp4:
            raise ValueError(
                "FP8/FP4 experts need TransformerEngine (TEGroupedMLP): use "
                "--transformer-impl transformer_engine, or drop --fp8-format/--fp4-format."
            )
        sequential = SequentialMLP(num_local_experts, config, submodules, pg_collection, name)
        super().__init__(config=sequential.config)  # moe_ffn_hidden_size applied
        self.num_local_experts = num_local_experts
        self.ep_group, self.tp_group, self.dp_group = (
            sequential.ep_group, sequential.tp_group, sequential.dp_group
        )  # fmt: skip
        experts = list(sequential.local_experts)
        self.activation_func = experts[0].activation_func
        self.linear_fc1 = GroupedLinear([e.linear_fc1 for e in experts], tp_axis=1)
        self.linear_fc2 = GroupedLinear([e.linear_fc2 for e in experts], tp_axis=2)
        del sequential, experts  # the per-expert copies go now
        self.activation_recompute = (
            self.config.recompute_granularity == "selective"
            and "moe_act" in (self.config.recompute_modules or ())
        )

    def grouped(self, x: torch.Tensor) -> bool:
        """Whether both projections take ``x``'s dtype and device through ``grouped_mm``."""
        return self.linear_fc1.takes_grouped_mm(x) and self.linear_fc2.takes_grouped_mm(x)

    def _activation(self, h, bias_rows, probs):
        """Megatron's MLP activation (bias, GLU, clamps, fusions, times ``probs``) on fc1's output.

        ``h: [rows, out1]``; MLP.forward is run on stand-ins for its two linears.
        """
        view = types.SimpleNamespace(
            config=self.config, activation_func=self.activation_func,
            linear_fc1=_ReturnsInput(bias_rows), linear_fc2=_ReturnsInput(None),
        )  # fmt: skip
        return MLP.forward(view, h, per_token_scale=probs)[0]

    def forward(
        self,
        permuted_local_hidden_states: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        permuted_probs: torch.Tensor,
    ):
        """``([rows, H], None)`` from the rows of the local experts, grouped by expert.

        Args:
            permuted_local_hidden_states: ``[rows, H]``, rows of expert 0 first, then 1, ...
            tokens_per_expert: ``[num_local_experts]`` rows of each expert (any device).
            permuted_probs: ``[rows]`` routing probabilities.
        """
        x, probs = permuted_local_hidden_states, permuted_probs
        if not GroupedGemmMLP._warned_loop and not self.grouped(x):
            GroupedGemmMLP._warned_loop = True  # once per process: every layer would repeat it
            logger.warning(
                f"grouped-GEMM experts: torch's grouped_mm cannot take {x.dtype} on {x.device} "
                f"at weight shape {tuple(self.linear_fc1.weight.shape)} (CUDA needs bf16, and "
                "rows a multiple of 16 bytes): the experts run one by one (same numbers, "
                "slower). On a GPU, train with --bf16."
            )
        if self.config.moe_apply_probs_on_input:  # as SequentialMLP
            assert self.config.moe_router_topk == 1, (
                "`moe_apply_probs_on_input` only works with `moe_router_topk`=1."
            )
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        counts = tokens_per_expert.to(device=x.device, dtype=torch.int64)
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        expert_of_row = None  # only biases need each row's expert
        if self.linear_fc1.bias is not None:
            expert_of_row = torch.repeat_interleave(
                torch.arange(len(counts), device=x.device), counts, output_size=x.shape[0]
            )
        h, bias_rows = self.linear_fc1(x, offsets, expert_of_row)
        if self.activation_recompute:  # as TEGroupedMLP: keep fc1's output, not the act's
            # fp8=None: Megatron 0.19.2 reads `fp8 is not None` as "FP8 on" (random.py:740), and
            # its default False would reach for TransformerEngine.
            checkpoint = tensor_parallel.CheckpointWithoutOutput(fp8=None)
            act = checkpoint.checkpoint(self._activation, h, bias_rows, probs)
        else:
            act = self._activation(h, bias_rows, probs)
        output, bias_rows = self.linear_fc2(act, offsets, expert_of_row)
        if self.activation_recompute:
            checkpoint.discard_output_and_register_recompute(output)
        if bias_rows is not None:  # MLP.forward's expert path: bias times the probability
            output = (output + bias_rows * probs.unsqueeze(-1)).to(output.dtype)
        return output, None

    def backward_dw(self):
        """No delayed weight-gradient pass: the weight gradients come with the backward."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        stack_sequential_state(state_dict, prefix, self.num_local_experts)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """SequentialMLP's sharded keys, global shapes and offsets for the stacked tensors.

        Key ``{prefix}experts.linear_fc1.weight``, global shape ``(*layers, E_global, out, in)``;
        this rank holds experts ``[ep_rank * E, (ep_rank + 1) * E)`` (the expert axis is axis 0
        of the local tensor, where SequentialMLP prepends it per expert). A gated fc1 is saved
        as its two halves, each split over TP, as Megatron's ``apply_swiglu_sharded_factory``.
        """
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        if metadata.get("singleton_local_shards", False):
            raise ValueError(
                "this checkpoint format (singleton local shards) is not supported by the "
                "grouped-GEMM experts: drop --moe-grouped-gemm or use --ckpt-format torch_dist"
            )
        dp_rank, tp_rank = self.dp_group.rank(), self.tp_group.rank()
        first_expert = self.ep_group.rank() * self.num_local_experts
        global_experts = self.ep_group.size() * self.num_local_experts
        expert_axis = len(sharded_offsets)
        sharded = {}
        for name in _LINEARS:
            linear = getattr(self, name)
            key = f"{prefix}experts.{name}."
            gated = name == "linear_fc1" and self.config.gated_linear_unit
            tp_axes = {"weight": linear.tp_axis, "bias": linear.bias_tp_axis()}
            for attribute, tp_axis in tp_axes.items():
                param = getattr(linear, attribute)
                if param is not None:
                    sharded[f"{prefix}{name}.{attribute}"] = self._sharded_tensor(
                        key + attribute, param, sharded_offsets, tp_axis, gated, dp_rank
                    )
            sharded[f"{prefix}{name}._extra_state"] = [
                make_sharded_object_for_checkpoint(
                    None,
                    key + "_extra_state",
                    (*sharded_offsets, (expert_axis, first_expert + i, global_experts)),
                    replica_id=(0, tp_rank, dp_rank),
                )
                for i in range(self.num_local_experts)
            ]
        return sharded

    def _sharded_tensor(self, key, param, sharded_offsets, tp_axis, gated, dp_rank):
        prepend = len(sharded_offsets)
        tp_rank, tp_size = self.tp_group.rank(), self.tp_group.size()
        expert = (prepend, self.ep_group.rank(), self.ep_group.size())
        # SequentialMLP's replica ids: (PP, TP replica (0 when split over TP), expert DP rank).
        replica_id = (0, 0 if tp_axis is not None else tp_rank, dp_rank)

        def make(key, tensor, tp_offset, replica_id):
            split = () if tp_axis is None else ((prepend + tp_axis, *tp_offset),)
            return ShardedTensor.from_rank_offsets(
                key, tensor, *sharded_offsets, expert, *split,
                replica_id=replica_id, prepend_axis_num=prepend,
            )  # fmt: skip

        if not gated:
            return make(key, param, (tp_rank, tp_size), replica_id)

        def build(key, tensor, replica_id, flattened_range):
            # [gate; up] of this TP rank: gate is shard tp_rank of 2 * tp, up tp + tp_rank.
            gate, up = (half.contiguous() for half in torch.chunk(tensor, 2, dim=tp_axis))
            return [
                make(key, gate, (tp_rank, 2 * tp_size), replica_id),
                make(key, up, (tp_size + tp_rank, 2 * tp_size), replica_id),
            ]

        def merge(halves):
            return torch.cat(halves, dim=tp_axis)

        return ShardedTensorFactory(key, param, build, merge, replica_id)


def use_grouped_gemm_experts(layer_spec) -> bool:
    """Swaps ``SequentialMLP`` for :class:`GroupedGemmMLP` in a local layer spec's MoE experts.

    In place; the caller copies shared specs. Returns whether the spec had such experts.
    """
    mlp = getattr(layer_spec.submodules, "mlp", None)
    moe = getattr(mlp, "keywords", {}).get("submodules")
    experts = getattr(moe, "experts", None)
    if getattr(experts, "func", None) is not SequentialMLP:
        return False
    moe.experts = functools.partial(GroupedGemmMLP, *experts.args, **experts.keywords)
    return True
