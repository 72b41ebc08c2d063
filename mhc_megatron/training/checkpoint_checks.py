"""Checks of the checkpoint a run resumes from: where it is, whether it is whole, its state.

- :func:`inspect_load_dir`: ``--load`` must be a checkpoint directory with a readable tracker
  (:data:`TRACKER`), unless it is empty or missing and equal to ``--save`` (a new run).
  Megatron itself exits 0 on an unreadable tracker and silently trains from scratch on a
  ``--load`` that holds no checkpoint.
- :func:`verify_shards` and :func:`read_checkpoint_args`: every shard a ``torch_dist``
  checkpoint's ``.metadata`` refers to exists and is long enough, and its common state (the
  saved arguments) loads.
- :func:`check_optimizer_state_layout`: the distributed optimizer's default checkpoint format
  stores its state in parameter order, without names; resuming it with another expert module
  (``--moe-grouped-gemm`` on or off) would put the experts' Adam state on the wrong weights, and
  a TP/PP/EP change fails deep inside Megatron's loader.

The model the checkpoint holds is compared in :mod:`mhc_megatron.training.checkpoint_model_checks`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from mhc_megatron.training.run_check_error import RunCheckError
from mhc_megatron.training.run_lock import LOCK_NAME

TRACKER = "latest_checkpointed_iteration.txt"


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
