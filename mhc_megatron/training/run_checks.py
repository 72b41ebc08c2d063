"""Checks that run before Megatron starts.

The checkpoint to resume, the model it holds, the data, and one run per output directory.

Each failure raises :class:`RunCheckError` with a message that names the file or setting and
says what to pass instead; ``pretrain_mhc.py`` prints it and exits 1 on every rank, before any
process group exists, so nothing hangs and nothing is written.

- :func:`inspect_load_dir`: ``--load`` must be a checkpoint directory with a readable tracker
  (``latest_checkpointed_iteration.txt``), unless it is empty or missing and equal to
  ``--save`` (a new run). Megatron itself exits 0 on an unreadable tracker and silently trains
  from scratch on a ``--load`` that holds no checkpoint.
- :func:`verify_shards` and :func:`read_checkpoint_args`: every shard a ``torch_dist``
  checkpoint's ``.metadata`` refers to exists and is long enough, and its common state (the
  saved arguments) loads.
- :func:`model_differences` / :func:`adopt_checkpoint_vocab`: the settings that define the model
  (:data:`MODEL_SETTINGS`) must equal the checkpoint's; a layout change (TP, PP, VPP, EP, DP,
  recompute, backend) is not one of them. Megatron pads the vocabulary to a multiple of
  ``make_vocab_size_divisible_by * TP``, so a TP change would otherwise load a 384-row embedding
  into 512 rows without a word; the checkpoint's padded size is kept when the new TP divides it.
- :func:`read_index`, :func:`check_token_ids` and :func:`check_split`: ``.bin``/``.idx`` agree,
  token ids are below the vocabulary, and no split with a non-zero weight gets zero documents
  (Megatron's GPTDataset loops forever on an empty split). :func:`check_batch_token_ids` does
  the token check again on every batch ``get_batch`` reads.
- :func:`check_optimizer_state_layout`: the distributed optimizer's default checkpoint format
  stores its state in parameter order, without names; resuming it with another expert module
  (``--moe-grouped-gemm`` on or off) would put the experts' Adam state on the wrong weights, and
  a TP/PP/EP change fails deep inside Megatron's loader.
- :class:`RunLock`: an exclusive ``flock`` on ``<save>/mhc_run.lock`` held by rank 0 for the
  life of the run; a second run on the same directory is refused with the first one's host and
  pid. The lock goes with the process (a killed run leaves nothing to clean up).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TRACKER = "latest_checkpointed_iteration.txt"
LOCK_NAME = "mhc_run.lock"

# Settings that define the model a checkpoint holds (args attribute names). Anything else
# (parallel layout, recompute, backend, precision, optimizer, data, logging) may change on
# resume.
MODEL_SETTINGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
    "group_query_attention", "kv_channels", "multi_latent_attention", "q_lora_rank",
    "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "normalization",
    "norm_epsilon", "swiglu", "squared_relu", "add_bias_linear", "add_qkv_bias", "qk_layernorm",
    "position_embedding_type", "rotary_base", "rotary_percent",
    "untie_embeddings_and_output_weights", "num_experts", "moe_router_topk",
    "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_layer_freq",
    "moe_router_score_function", "moe_router_enable_expert_bias", "mtp_num_layers",
    "tokenizer_type", "tokenizer_model", "vocab_size", "padded_vocab_size", "mhc_variant",
    "mhc_num_streams", "mhc_collapse", "mhc_sinkhorn_iters", "mhc_eps",
)  # fmt: skip
# Only meaningful for one setting of another; compared only then.
_ONLY_WITH = {
    "max_position_embeddings": ("position_embedding_type", "learned_absolute"),
    # Megatron fills it in after validation when GQA is off (1 at parse time, heads later).
    "num_query_groups": ("group_query_attention", True),
}
_MHC_ONLY = {"mhc_num_streams", "mhc_collapse", "mhc_sinkhorn_iters", "mhc_eps"}

# Token scan of the .bin on rank 0: every byte up to this size, evenly spaced windows beyond
# (get_batch also checks every batch it reads).
FULL_SCAN_BYTES = 1 << 30
SCAN_WINDOWS = 64
_IDX_HEADER = b"MMIDIDX\x00\x00"
_IDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
               7: np.float32, 8: np.uint16}  # fmt: skip


class RunCheckError(RuntimeError):
    """A run that must not start (or go on); the message says what to change."""


@dataclass
class CheckpointInfo:
    """The checkpoint a run resumes from.

    Attributes:
        load_dir: ``--load``.
        iteration: the iteration to load (0 for a release checkpoint).
        release: a ``release`` checkpoint.
        path: its directory (``iter_XXXXXXX`` or ``release``).
        format: ``torch_dist`` or ``torch``.
    """

    load_dir: Path
    iteration: int
    release: bool
    path: Path
    format: str


def _same_dir(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


def _iteration_dirs(directory: Path) -> list[int]:
    found = []
    for entry in directory.glob("iter_*"):
        suffix = entry.name[len("iter_") :]
        if entry.is_dir() and suffix.isdigit():
            found.append(int(suffix))
    return sorted(found)


def available_iterations(directory: Path) -> str:
    """The checkpoint iterations in ``directory``, for messages ("3, 6" or "none")."""
    iterations = _iteration_dirs(directory)
    return ", ".join(map(str, iterations)) if iterations else "none"


def inspect_load_dir(load: str | None, save: str | None, ckpt_step: int | None = None):
    """The checkpoint ``--load`` points at, or None for a new run.

    Args:
        load: ``--load`` (None: nothing to resume).
        save: ``--save``; an empty or missing ``--load`` equal to it starts a new run.
        ckpt_step: ``--ckpt-step`` (load this iteration instead of the tracker's).

    Returns:
        :class:`CheckpointInfo`, or None when there is nothing to resume.

    Raises:
        RunCheckError: ``--load`` is missing, a file, not a checkpoint directory, or its tracker
            or iteration directory is unreadable.
    """
    if not load:  # None, or '' (how a launcher's --load is switched off)
        return None
    directory = Path(load)
    new_run = "; with --load equal to --save, a missing or empty directory starts a new run"
    if not directory.exists():
        if _same_dir(load, save):
            return None
        raise RunCheckError(
            f"--load {load} does not exist. Pass the --save directory of the run to resume, or "
            f"drop --load to train from scratch{new_run}."
        )
    if not directory.is_dir():
        raise RunCheckError(
            f"--load {load} is a file, not a checkpoint directory. Pass the directory a run's "
            "--save wrote (it holds latest_checkpointed_iteration.txt and iter_* directories)."
        )
    tracker = directory / TRACKER
    release = False
    if ckpt_step:
        iteration = int(ckpt_step)
    elif tracker.is_file():
        text = tracker.read_text(errors="replace").strip()
        if text == "release":
            iteration, release = 0, True
        elif text.isdigit():
            iteration = int(text)
        else:
            shown = repr(text[:40]) if text else "nothing"
            raise RunCheckError(
                f"{tracker} holds {shown}; it must hold an iteration number (or 'release'). "
                f"Write the number of the newest complete checkpoint into it (iter_* directories "
                f"here: {available_iterations(directory)}) or pass --ckpt-step N."
            )
    else:
        entries = [e.name for e in directory.iterdir() if e.name != LOCK_NAME]
        if not entries and _same_dir(load, save):
            return None
        if _iteration_dirs(directory):
            raise RunCheckError(
                f"--load {load} has checkpoint directories (iterations "
                f"{available_iterations(directory)}) but no {TRACKER} (a save that did not "
                f"finish?). Pass --ckpt-step N to load one, or write N into {tracker}."
            )
        if not entries:
            raise RunCheckError(
                f"--load {load} is empty and is not the --save directory ({save}): there is "
                f"nothing to resume. Pass a directory with checkpoints{new_run}."
            )
        listed = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise RunCheckError(
            f"--load {load} is not a checkpoint directory: it has no {TRACKER} and no iter_* "
            f"directories (it holds {listed}). Pass the --save directory of the run to resume"
            f"{new_run}."
        )
    path = directory / ("release" if release else f"iter_{iteration:07d}")
    if not path.is_dir():
        raise RunCheckError(
            f"--load {load}: checkpoint {path.name} does not exist (iterations here: "
            f"{available_iterations(directory)}). Pass --ckpt-step N with one of them, or fix "
            f"{tracker}."
        )
    if (path / "metadata.json").is_file():
        fmt = "torch_dist"
    elif any(e.name.startswith("mp_rank_") for e in path.iterdir()):
        fmt = "torch"
    else:
        raise RunCheckError(
            f"{path} is not a Megatron checkpoint (no metadata.json, no mp_rank_* files): a save "
            f"that did not finish? Pass --ckpt-step N with an earlier iteration "
            f"({available_iterations(directory)})."
        )
    return CheckpointInfo(directory, iteration, release, path, fmt)


def _damaged(info: CheckpointInfo, what: str) -> RunCheckError:
    earlier = [i for i in _iteration_dirs(info.load_dir) if i < info.iteration]
    hint = (
        f"Resume from an earlier checkpoint with --ckpt-step {earlier[-1]} (available: "
        f"{', '.join(map(str, earlier))})"
        if earlier
        else "There is no earlier checkpoint here; restore this one from a copy"
    )
    return RunCheckError(f"checkpoint {info.path} is damaged: {what}. {hint}.")


def verify_shards(info: CheckpointInfo) -> None:
    """Every shard file of a ``torch_dist`` checkpoint exists and covers what ``.metadata`` says.

    Raises:
        RunCheckError: naming the missing or truncated files.
    """
    if info.format != "torch_dist":
        return
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(info.path)).read_metadata()
    except Exception as error:  # noqa: BLE001 - any failure means the same: unreadable
        raise _damaged(info, f"{info.path / '.metadata'} cannot be read ({error})") from error
    needed: dict[str, int] = {}
    for storage in metadata.storage_data.values():
        end = storage.offset + storage.length
        needed[storage.relative_path] = max(needed.get(storage.relative_path, 0), end)
    problems = []
    for name, end in sorted(needed.items()):
        shard = info.path / name
        if not shard.is_file():
            problems.append(f"{shard} is missing")
        elif shard.stat().st_size < end:
            problems.append(f"{shard} has {shard.stat().st_size} bytes, .metadata needs {end}")
    if problems:
        raise _damaged(info, "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))


def read_checkpoint_args(info: CheckpointInfo) -> argparse.Namespace | None:
    """The arguments the checkpoint was saved with (None if it has none).

    Raises:
        RunCheckError: the common state cannot be read.
    """
    import torch
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        if info.format == "torch_dist":
            from megatron.core import dist_checkpointing

            state = dist_checkpointing.load_common_state_dict(str(info.path))
        else:
            files = sorted(info.path.glob("mp_rank_*/model_optim_rng.pt"))
            if not files:
                raise FileNotFoundError(f"no mp_rank_*/model_optim_rng.pt in {info.path}")
            state = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)
    # CheckpointException is a BaseException: what DCP raises for a shard it cannot decode.
    except (Exception, CheckpointException) as error:
        first_line = str(error).splitlines()[0] if str(error) else ""
        what = f"its common state cannot be read ({type(error).__name__}: {first_line})"
        raise _damaged(info, what) from error
    return state.get("args") if isinstance(state, dict) else None


def _normalized(value):
    if isinstance(value, tuple):
        return list(value)
    return value


def model_differences(ckpt_args, args) -> list[tuple[str, object, object]]:
    """``[(setting, checkpoint value, this run's value)]`` over :data:`MODEL_SETTINGS`.

    Settings missing from either side (older checkpoints) are not compared; a checkpoint without
    ``mhc_variant`` is a plain residual model. The mHC settings are compared only when either
    side is an mHC model.
    """
    differences = []
    variants = (getattr(ckpt_args, "mhc_variant", "residual"), getattr(args, "mhc_variant", None))
    both_residual = all(v in (None, "residual") for v in variants)
    names = list(MODEL_SETTINGS) + list(_ONLY_WITH)
    for name in names:
        if name in _MHC_ONLY and both_residual:
            continue
        if name in _ONLY_WITH:
            other, value = _ONLY_WITH[name]
            if value not in (getattr(args, other, None), getattr(ckpt_args, other, None)):
                continue
        if name == "mhc_variant":
            theirs = variants[0]
        elif hasattr(ckpt_args, name):
            theirs = getattr(ckpt_args, name)
        else:
            continue
        if not hasattr(args, name):
            continue
        ours = getattr(args, name)
        if _normalized(theirs) != _normalized(ours):
            differences.append((name, theirs, ours))
    return differences


def _flag_hint(name: str, value, actions: dict[str, argparse.Action]) -> str:
    """What to pass to get ``value`` for setting ``name`` (from the argument parser)."""
    action = actions.get(name)
    if name == "padded_vocab_size":
        return "(derived from --vocab-size, --make-vocab-size-divisible-by and TP)"
    if action is None:
        return ""
    flag = max(action.option_strings, key=len)
    if isinstance(action, argparse._StoreTrueAction):
        return f"pass {flag}" if value else f"drop {flag}"
    if isinstance(action, argparse._StoreFalseAction):
        return f"drop {flag}" if value else f"pass {flag}"
    if value is None:
        return f"drop {flag}"
    if isinstance(value, list | tuple):
        if name == "moe_layer_freq":
            return f'pass {flag} "[{",".join(map(str, value))}]"'
        return f"pass {flag} {' '.join(map(str, value))}"
    return f"pass {flag} {value}"


def parser_actions() -> dict[str, argparse.Action]:
    """``{dest: action}`` of pretrain_mhc.py's arguments (Megatron's plus ``--mhc-*``)."""
    from megatron.training.arguments import add_megatron_arguments

    from mhc_megatron.training.arguments import add_mhc_args

    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_mhc_args(add_megatron_arguments(parser))
    actions = {}
    for action in parser._actions:
        # Prefer the positive flag for settings with both (e.g. --bias-linear/--disable-...).
        actions.setdefault(action.dest, action)
    return actions


def adopt_checkpoint_vocab(ckpt_args, args) -> str | None:
    """Keeps the checkpoint's padded vocabulary when this run's TP divides it.

    Megatron pads ``--vocab-size`` to a multiple of ``make_vocab_size_divisible_by * TP``, so
    the same model gets another embedding size at another TP. With the checkpoint's size the TP
    change continues the run exactly as a PP change does.

    Returns:
        A line for the log when ``args.padded_vocab_size`` was changed, else None. Leaves the
        arguments alone when the vocabulary itself differs or TP does not divide the size
        (:func:`model_differences` then reports it).
    """
    theirs = getattr(ckpt_args, "padded_vocab_size", None)
    ours = getattr(args, "padded_vocab_size", None)
    if theirs is None or ours is None or theirs == ours:
        return None
    if getattr(ckpt_args, "vocab_size", None) != getattr(args, "vocab_size", None):
        return None
    if getattr(ckpt_args, "tokenizer_type", None) != getattr(args, "tokenizer_type", None):
        return None
    if theirs % args.tensor_model_parallel_size != 0:
        return None
    args.padded_vocab_size = theirs
    return (
        f"> padded vocabulary: {theirs} rows from the checkpoint (this layout alone would pad to "
        f"{ours}; TP {args.tensor_model_parallel_size} divides {theirs})"
    )


def expert_module(args) -> str | None:
    """The module that holds the routed experts' parameters (None for a dense model).

    The distributed optimizer's default checkpoint format keeps its state in the order of the
    parameters, which differs between these modules (one parameter per expert and projection,
    per-expert parameters of one grouped linear, or one stacked parameter per projection).
    """
    if not getattr(args, "num_experts", None):
        return None
    if not getattr(args, "moe_grouped_gemm", False):
        return "SequentialMLP"
    if getattr(args, "transformer_impl", "transformer_engine") == "local":
        return "GroupedGemmMLP"
    return "TEGroupedMLP"


# Layout settings a dp_reshardable distributed-optimizer state cannot change (it re-shards over
# data parallelism only): its buffers hold this rank's parameters, in order, by these splits.
_DP_RESHARDABLE_LAYOUT = {
    "tensor_model_parallel_size": "--tensor-model-parallel-size",
    "pipeline_model_parallel_size": "--pipeline-model-parallel-size",
    "virtual_pipeline_model_parallel_size": "--num-layers-per-virtual-pipeline-stage",
    "expert_model_parallel_size": "--expert-model-parallel-size",
    "expert_tensor_parallel_size": "--expert-tensor-parallel-size",
}


def check_optimizer_state_layout(info: CheckpointInfo, ckpt_args, args) -> None:
    """Refuses to load a ``dp_reshardable`` distributed-optimizer state into another layout.

    That format (Megatron's default with ``--use-distributed-optimizer``) stores the optimizer
    state as flat buffers in parameter order and loads them without looking at names. After a
    switch between SequentialMLP and grouped experts, every Adam moment (and fp32 master
    weight) of the experts lands on another weight and the run goes on with a wrong loss curve;
    after a TP/PP/EP change the load fails deep in Megatron with a shape mismatch.

    Raises:
        RunCheckError: what differs and what to pass.
    """
    if not getattr(ckpt_args, "use_distributed_optimizer", False):
        return
    if getattr(ckpt_args, "dist_ckpt_optim_fully_reshardable", False):
        return  # saved in model space, by sharded keys: any layout loads it
    if getattr(args, "no_load_optim", False) or getattr(args, "finetune", False):
        return
    changes = []
    theirs, ours = expert_module(ckpt_args), expert_module(args)
    if None not in (theirs, ours) and theirs != ours:
        fixes = []
        if ckpt_args.moe_grouped_gemm != getattr(args, "moe_grouped_gemm", False):
            fixes.append("pass --moe-grouped-gemm" if ckpt_args.moe_grouped_gemm
                         else "drop --moe-grouped-gemm")  # fmt: skip
        impl = getattr(ckpt_args, "transformer_impl", None)
        if impl is not None and impl != getattr(args, "transformer_impl", None):
            fixes.append(f"pass --transformer-impl {impl}")
        changes.append(
            f"  experts: checkpoint {theirs}, this run {ours} (their parameters come in another "
            f"order: the optimizer state would land on the wrong weights)  {' and '.join(fixes)}"
        )
    for name, flag in _DP_RESHARDABLE_LAYOUT.items():
        if not (hasattr(ckpt_args, name) and hasattr(args, name)):
            continue
        saved, now = getattr(ckpt_args, name), getattr(args, name)
        if saved != now:
            changes.append(f"  {name}: checkpoint {saved}, this run {now}  (pass {flag} to match)")
    if changes:
        raise RunCheckError(
            "\n".join([
                f"the checkpoint in {info.load_dir} (iteration {info.iteration}) holds the "
                "distributed optimizer's state in its default format (dp_reshardable), which "
                "re-shards over data parallelism only; this run differs in:",
                *changes,
                "Resume with the checkpoint's settings, or pass --no-load-optim to start the "
                "optimizer state afresh. To change these at a resume, save with "
                "--dist-ckpt-optim-fully-reshardable.",
            ])
        )  # fmt: skip


def describe_differences(info: CheckpointInfo, differences, args, actions) -> str:
    """The refusal message: each differing setting, both values and what to pass."""
    lines = [
        f"the checkpoint in {info.load_dir} (iteration {info.iteration}) holds a different model "
        "than this run:"
    ]
    for name, theirs, ours in differences:
        hint = _flag_hint(name, theirs, actions)
        lines.append(f"  {name}: checkpoint {theirs!r}, this run {ours!r}  {hint}".rstrip())
        if name == "padded_vocab_size" and theirs % args.tensor_model_parallel_size:
            divisors = [d for d in range(1, 65) if theirs % d == 0]
            lines.append(
                f"    the checkpoint's {theirs} embedding rows cannot be split over TP "
                f"{args.tensor_model_parallel_size}: use a --tensor-model-parallel-size that "
                f"divides it ({', '.join(map(str, divisors))}); a new run that should resume at "
                f"any TP up to 8 can pass --make-vocab-size-divisible-by 1024"
            )
    lines.append(
        "A layout change (TP, PP, VPP, EP, DP, recompute, backend) resumes the same model; these "
        "settings define it. Pass the checkpoint's values, point --load/--save elsewhere for a "
        "new run, or pass --allow-checkpoint-model-change to load these weights into this model "
        "anyway (fine-tuning; usually with --finetune)."
    )
    return "\n".join(lines)


@dataclass
class IndexedDatasetInfo:
    """What the ``.idx`` of an indexed dataset says (and the ``.bin`` agrees with).

    Attributes:
        documents: number of documents.
        sequences: number of sequences.
        dtype: token dtype.
        tokens_before_document: ``[documents + 1]`` int64, tokens before each document (the
            last entry is the corpus size in tokens).
    """

    documents: int
    sequences: int
    dtype: type
    tokens_before_document: np.ndarray


def read_index(prefix: str) -> IndexedDatasetInfo:
    """Reads ``prefix.idx`` and checks ``prefix.bin`` against it.

    Raises:
        RunCheckError: a bad header, a truncated ``.idx``, or a ``.bin`` whose size is not what
            the ``.idx`` describes (truncated, or the ``.idx`` of another file).
    """
    idx_path, bin_path = Path(prefix + ".idx"), Path(prefix + ".bin")
    fix = f"Re-create both with tools/preprocess_data.py (--output-prefix {prefix})."
    size = idx_path.stat().st_size
    with open(idx_path, "rb") as stream:
        head = stream.read(34)
    if len(head) < 34 or head[:9] != _IDX_HEADER or struct.unpack("<Q", head[9:17])[0] != 1:
        raise RunCheckError(f"{idx_path} is not a Megatron index file (bad header). {fix}")
    code = head[17]
    if code not in _IDX_DTYPES:
        raise RunCheckError(f"{idx_path} names an unknown token dtype (code {code}). {fix}")
    dtype = _IDX_DTYPES[code]
    sequences, doc_entries = struct.unpack("<QQ", head[18:34])
    expected = 34 + 4 * sequences + 8 * sequences + 8 * doc_entries
    if size not in (expected, expected + sequences):  # + 1 byte per sequence when multimodal
        raise RunCheckError(
            f"{idx_path} has {size} bytes but its header describes {sequences} sequences and "
            f"{doc_entries - 1} documents ({expected} bytes): it is truncated or damaged. {fix}"
        )
    mm = np.memmap(idx_path, mode="r")
    lengths = np.frombuffer(mm, dtype=np.int32, count=sequences, offset=34)
    pointers = np.frombuffer(mm, dtype=np.int64, count=sequences, offset=34 + 4 * sequences)
    doc_index = np.frombuffer(mm, dtype=np.int64, count=doc_entries, offset=34 + 12 * sequences)
    itemsize = np.dtype(dtype).itemsize
    bin_expected = int(pointers[-1] + lengths[-1] * itemsize) if sequences else 0
    if doc_entries < 1 or doc_index[0] != 0 or doc_index[-1] != sequences:
        raise RunCheckError(f"{idx_path}: its document index does not cover its sequences. {fix}")
    bin_size = bin_path.stat().st_size
    if bin_size != bin_expected:
        what = (
            "it is truncated"
            if bin_size < bin_expected
            else "the .idx describes only part of it (the .idx of another file?)"
        )
        raise RunCheckError(
            f"{bin_path} has {bin_size} bytes but {idx_path} describes {bin_expected} "
            f"({sequences} sequences of {np.dtype(dtype).name}): {what}. {fix}"
        )
    starts = np.append(pointers, bin_expected) // itemsize
    tokens_before = starts[doc_index].astype(np.int64)
    return IndexedDatasetInfo(doc_entries - 1, sequences, dtype, tokens_before)


def max_token_id(prefix: str, info: IndexedDatasetInfo) -> tuple[int, bool]:
    """``(largest token id, whether every token was read)`` of ``prefix.bin``.

    Reads all of it up to :data:`FULL_SCAN_BYTES`, else :data:`SCAN_WINDOWS` evenly spaced
    windows.
    """
    data = np.memmap(prefix + ".bin", dtype=info.dtype, mode="r")
    if data.size == 0:
        return -1, True
    if data.nbytes <= FULL_SCAN_BYTES:
        return int(data.max()), True
    window = FULL_SCAN_BYTES // SCAN_WINDOWS // data.itemsize
    starts = np.linspace(0, data.size - window, SCAN_WINDOWS).astype(np.int64)
    return max(int(data[s : s + window].max()) for s in starts), False


def foreign_token_error(where: str, token: int, vocab_size: int, tokenizer: str):
    """The RunCheckError for a token id outside ``[0, vocab_size)`` found in ``where``."""
    return RunCheckError(
        f"{where} holds token id {token}, outside the {vocab_size} ids of the tokenizer "
        f"(--tokenizer-type {tokenizer}): the data was tokenized with another tokenizer. Pass "
        "the tokenizer (and --vocab-size) it was made with, or re-tokenize it with "
        "tools/preprocess_data.py."
    )


def check_token_ids(prefix: str, info: IndexedDatasetInfo, vocab_size: int, tokenizer: str):
    """Raises RunCheckError when ``prefix.bin`` holds a token id >= ``vocab_size``."""
    largest, complete = max_token_id(prefix, info)
    if largest >= vocab_size:
        where = f"{prefix}.bin" + ("" if complete else " (a sample of it)")
        raise foreign_token_error(where, largest, vocab_size, tokenizer)


def check_batch_token_ids(batch: dict, vocab_size: int, tokenizer: str) -> None:
    """Raises RunCheckError when a batch's ``tokens`` or ``labels`` leave ``[0, vocab_size)``.

    Such ids would fail deep in the embedding with a bare IndexError (or, below the padded
    size, train rows no token should reach). Meant for the batch while it is still on the CPU,
    where the check costs no device synchronisation.
    """
    for key in ("tokens", "labels"):
        value = batch.get(key)
        if value is None or value.numel() == 0:
            continue
        largest, smallest = int(value.max()), int(value.min())
        if largest >= vocab_size or smallest < 0:
            bad = largest if largest >= vocab_size else smallest
            raise foreign_token_error(f"a training batch ({key!r})", bad, vocab_size, tokenizer)


def check_split(prefix: str, info: IndexedDatasetInfo, split: str, split_matrix) -> None:
    """Raises RunCheckError when a split with a non-zero weight gets no documents or no tokens.

    Args:
        prefix: the dataset (for the message).
        info: its index.
        split: ``--split`` as given.
        split_matrix: ``[(begin, end)]`` fractions per split (train, valid, test), None for a
            split of weight 0, as Megatron's ``GPTDatasetConfig.split_matrix``.
    """
    names = ("train", "valid", "test")
    for name, bounds in zip(names, split_matrix, strict=False):
        if bounds is None:
            continue
        # The rounding of BlendedMegatronDatasetBuilder._build_megatron_dataset_splits.
        begin = int(round(bounds[0] * float(info.documents)))
        end = int(round(bounds[1] * float(info.documents)))
        tokens = int(info.tokens_before_document[end] - info.tokens_before_document[begin])
        if end > begin and tokens > 0:
            continue
        got = f"{end - begin} of {info.documents} documents" + (
            f" ({tokens} tokens)" if end > begin else ""
        )
        raise RunCheckError(
            f"--split {split} gives the {name} split {got} of {prefix}: Megatron would loop "
            f"forever building it. Give {name} a weight of 0 in --split (with --eval-iters 0 "
            "for valid), a larger share, or use more data."
        )


def check_data(args, vocab_size: int | None) -> None:
    """The data checks for Megatron's parsed arguments (no-op with ``--mock-data``).

    Every rank checks the indexes and the split (cheap); rank 0 also scans the tokens.
    """
    if args.mock_data:
        return
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, _ = get_blend_and_blend_per_split(args)
    blended = set(blend[0]) if blend else set()
    split_vector = parse_and_normalize_split(args.split)
    split_matrix = convert_split_vector_to_split_matrix(split_vector)
    for prefix in dict.fromkeys(data_prefixes(args)):
        if prefix.startswith(("s3://", "msc://")):
            continue
        info = read_index(prefix)
        if _global_rank() == 0 and vocab_size is not None:
            check_token_ids(prefix, info, vocab_size, args.tokenizer_type)
        if prefix in blended:
            check_split(prefix, info, args.split, split_matrix)


def data_prefixes(args) -> list[str]:
    """The dataset prefixes of ``--data-path`` and of the per-split ``--*-data-path`` flags."""
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    prefixes = list(blend[0]) if blend else []
    for split_blend in blend_per_split or []:
        prefixes += list(split_blend[0]) if split_blend else []
    return prefixes


class RunLock:
    """An exclusive lock on ``<directory>/mhc_run.lock`` for the life of this process.

    Args:
        directory: the run's ``--save`` directory (created if missing).
    """

    def __init__(self, directory: str):
        self.path = Path(directory) / LOCK_NAME
        self._file = None

    def acquire(self) -> None:
        """Takes the lock or raises RunCheckError naming the run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the life of the run
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunCheckError(
                f"another run is using --save {self.path.parent} ({holder}). Two runs on one "
                "directory overwrite each other's checkpoints: wait for it to end, stop it, or "
                "pass another --save."
            ) from None
        except OSError as error:  # a file system without flock: warn, do not block the run
            print(f"warning: cannot lock {self.path} ({error}); two runs could share --save")
            self._file = handle
            return
        handle.seek(0)
        handle.truncate()
        handle.write(
            f"host {socket.gethostname()}, pid {os.getpid()}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        )
        handle.flush()
        self._file = handle

    def release(self) -> None:
        """Drops the lock (it also goes when the process ends)."""
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


_RUN_LOCK: RunLock | None = None


def _global_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def check_schedule(args) -> None:
    """Checks the learning-rate schedule before Megatron's OptimizerParamScheduler does.

    There its violations are bare AssertionErrors.

    Raises:
        RunCheckError: ``--min-lr`` above ``--lr``, or a warmup that does not end before the
            decay (both in iterations, or both in samples).
    """
    lr, min_lr = getattr(args, "lr", None), getattr(args, "min_lr", 0.0) or 0.0
    if lr is not None and min_lr > lr:
        raise RunCheckError(f"--min-lr {min_lr:g} is above --lr {lr:g}: lower --min-lr")
    if getattr(args, "train_iters", None):
        unit, total = "iterations", args.train_iters
        decay, decay_flag = args.lr_decay_iters or total, "--lr-decay-iters"
        warmup_flag = "--lr-warmup-iters"
        warmup = args.lr_warmup_iters
    elif getattr(args, "train_samples", None):
        unit, total = "samples", args.train_samples
        decay, decay_flag = args.lr_decay_samples or total, "--lr-decay-samples"
        warmup_flag = "--lr-warmup-samples"
        warmup = args.lr_warmup_samples
    else:
        return  # Megatron's own message covers neither being set
    if args.lr_warmup_fraction is not None:
        warmup, warmup_flag = args.lr_warmup_fraction * decay, "--lr-warmup-fraction"
    if decay <= 0 or warmup >= decay:
        raise RunCheckError(
            f"the learning-rate warmup ({warmup:g} {unit}, {warmup_flag}) must end before the "
            f"decay does ({decay:g} {unit}, {decay_flag} or the run's length): lower "
            f"{warmup_flag} or lengthen the run"
        )


def check_run(args, vocab_size: int | None) -> list[str]:
    """Every check before ``pretrain()``; adopts the checkpoint's padded vocabulary.

    Args:
        args: Megatron's parsed and validated arguments (``padded_vocab_size`` may change).
        vocab_size: the tokenizer's vocabulary size (token ids must be below it).

    Returns:
        Lines for the log (what was adopted from the checkpoint).

    Raises:
        RunCheckError: what must change before this run can start.
    """
    global _RUN_LOCK
    notes = []
    check_schedule(args)
    info = inspect_load_dir(args.load, args.save, getattr(args, "ckpt_step", None))
    if info is not None:
        verify_shards(info)
        ckpt_args = read_checkpoint_args(info)
        if ckpt_args is not None:
            note = adopt_checkpoint_vocab(ckpt_args, args)
            if note:
                notes.append(note)
            check_optimizer_state_layout(info, ckpt_args, args)
            differences = model_differences(ckpt_args, args)
            if differences and not args.allow_checkpoint_model_change:
                raise RunCheckError(describe_differences(info, differences, args, parser_actions()))
            if differences:
                notes.append(
                    "> --allow-checkpoint-model-change: loading a checkpoint of another model ("
                    + ", ".join(name for name, _, _ in differences)
                    + ")"
                )
    check_data(args, vocab_size)
    if args.save and _global_rank() == 0 and _RUN_LOCK is None:
        lock = RunLock(args.save)
        lock.acquire()
        _RUN_LOCK = lock
    return notes
