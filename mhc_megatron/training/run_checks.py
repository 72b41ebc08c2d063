"""Checks that run before Megatron starts.

The checkpoint to resume, the model it holds, the data, and one run per output directory.

Each failure raises :class:`RunCheckError` with a message that names the file or setting and
says what to pass instead; ``pretrain_mhc.py`` prints it and exits 1 on every rank, before any
process group exists, so nothing hangs and nothing is written. :func:`check_run` runs them all,
in this order:

- :func:`check_schedule` (here): ``--min-lr`` is not above ``--lr`` and the warmup ends before
  the decay (Megatron's own checks are bare AssertionErrors).
- :func:`inspect_load_dir` (``checkpoint_checks``): ``--load`` must be a checkpoint directory
  with a readable tracker (``latest_checkpointed_iteration.txt``), unless it is empty or missing
  and equal to ``--save`` (a new run). Megatron itself exits 0 on an unreadable tracker and
  silently trains from scratch on a ``--load`` that holds no checkpoint.
- :func:`verify_shards` and :func:`read_checkpoint_args` (``checkpoint_checks``): every shard a
  ``torch_dist`` checkpoint's ``.metadata`` refers to exists and is long enough, and its common
  state (the saved arguments) loads.
- :func:`adopt_checkpoint_vocab` / :func:`model_differences` (``checkpoint_model_checks``): the
  settings that define the model (:data:`MODEL_SETTINGS`) must equal the checkpoint's; a layout
  change (TP, PP, VPP, EP, DP, recompute, backend) is not one of them. Megatron pads the
  vocabulary to a multiple of ``make_vocab_size_divisible_by * TP``, so a TP change would
  otherwise load a 384-row embedding into 512 rows without a word; the checkpoint's padded size
  is kept when the new TP divides it.
- :func:`check_optimizer_state_layout` (``checkpoint_checks``): the distributed optimizer's
  default checkpoint format stores its state in parameter order, without names; resuming it with
  another expert module (``--moe-grouped-gemm`` on or off) would put the experts' Adam state on
  the wrong weights, and a TP/PP/EP change fails deep inside Megatron's loader.
- :func:`read_index`, :func:`check_token_ids` and :func:`check_split` (``data_checks``, run by
  :func:`check_data`): ``.bin``/``.idx`` agree, token ids are below the vocabulary, and no split
  with a non-zero weight gets zero documents (Megatron's GPTDataset loops forever on an empty
  split). :func:`check_batch_token_ids` does the token check again on every batch ``get_batch``
  reads.
- :class:`RunLock` (``run_lock``): an exclusive ``flock`` on ``<save>/mhc_run.lock`` held by
  rank 0 for the life of the run; a second run on the same directory is refused with the first
  one's host and pid. The lock goes with the process (a killed run leaves nothing to clean up).

Every public name of those modules is importable from here too.
"""

from __future__ import annotations

from mhc_megatron.training.checkpoint_checks import (
    TRACKER,
    CheckpointInfo,
    available_iterations,
    check_optimizer_state_layout,
    expert_module,
    inspect_load_dir,
    read_checkpoint_args,
    verify_shards,
)
from mhc_megatron.training.checkpoint_model_checks import (
    MODEL_SETTINGS,
    adopt_checkpoint_vocab,
    describe_differences,
    model_differences,
    parser_actions,
)
from mhc_megatron.training.data_checks import (
    FULL_SCAN_BYTES,
    SCAN_WINDOWS,
    IndexedDatasetInfo,
    _global_rank,
    check_batch_token_ids,
    check_data,
    check_split,
    check_token_ids,
    data_prefixes,
    foreign_token_error,
    max_token_id,
    read_index,
)
from mhc_megatron.training.run_check_error import RunCheckError
from mhc_megatron.training.run_lock import LOCK_NAME, RunLock

__all__ = [
    "FULL_SCAN_BYTES",
    "LOCK_NAME",
    "MODEL_SETTINGS",
    "SCAN_WINDOWS",
    "TRACKER",
    "CheckpointInfo",
    "IndexedDatasetInfo",
    "RunCheckError",
    "RunLock",
    "adopt_checkpoint_vocab",
    "available_iterations",
    "check_batch_token_ids",
    "check_data",
    "check_optimizer_state_layout",
    "check_run",
    "check_schedule",
    "check_split",
    "check_token_ids",
    "data_prefixes",
    "describe_differences",
    "expert_module",
    "foreign_token_error",
    "inspect_load_dir",
    "max_token_id",
    "model_differences",
    "parser_actions",
    "read_checkpoint_args",
    "read_index",
    "verify_shards",
]

_RUN_LOCK: RunLock | None = None


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
