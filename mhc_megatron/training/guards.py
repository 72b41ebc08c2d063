"""Run-time guards around Megatron's training loop.

No non-finite step is applied or saved, and a load that fails says which checkpoint and what to
do.

The wrappers are installed by ``megatron_patches.install`` (the list of every Megatron patch);
this module only builds them.

Non-finite steps. Megatron applies a step whose gradients hold NaN/inf unless fp16's loss
scaler catches it: with bf16 or fp32, ``--check-for-nan-in-loss-and-grad`` hands the problem to
the rerun state machine, which re-runs the iteration, talks about "a different GPU", saves the
model (NaN by then) and exits; a NaN grad norm alone was applied and logged with "number of
skipped iterations: 0". Here, before every ``optimizer.step()``, one flag per rank (any
non-finite value in the gradient buffers, or a non-finite loss) is all-reduced over the world;
when set, the step is not taken (Megatron then counts a skipped iteration and does not advance
the LR schedule) and rank 0 prints the first site whose coefficients went non-finite in the
forward pass and the first parameter whose gradient did. ``--nonfinite-step stop`` exits at the
first one; ``--max-nonfinite-steps-in-a-row`` (default 10) stops a run that only skips. Megatron's
own NaN checks are turned off: this guard replaces them.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from mhc_megatron.megatron.diagnostics import NONFINITE_SITES
from mhc_megatron.training.run_checks import RunCheckError, available_iterations


class _NonFiniteLoss:
    """Whether any training micro-batch of this iteration had a non-finite loss.

    A device flag, read only when the optimizer step is about to run.
    """

    flag: torch.Tensor | None = None

    def note(self, loss: torch.Tensor) -> None:
        if not torch.is_grad_enabled():  # evaluation: no step follows
            return
        bad = ~torch.isfinite(loss.detach()).all()
        self.flag = bad if self.flag is None else self.flag | bad

    def reset(self) -> None:
        self.flag = None


NONFINITE_LOSS = _NonFiniteLoss()


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _any_rank(local: torch.Tensor) -> bool:
    """True when the boolean scalar ``local`` is true on any rank: one all-reduce.

    ``local`` is on the model's device, which the process group's backend takes.
    """
    flag = local.to(torch.float32).reshape(1)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item() > 0)


def _model_device(model_chunks) -> torch.device:
    return next(p for chunk in model_chunks for p in chunk.parameters()).device


def _grad_of(param: torch.nn.Parameter) -> torch.Tensor | None:
    """Megatron DDP's ``main_grad`` where it exists, else ``grad``."""
    grad = getattr(param, "main_grad", None)
    return param.grad if grad is None else grad


def _param_name(name: str) -> str:
    """A parameter's name without the ``module.`` prefixes of DDP and Float16Module."""
    while name.startswith("module."):
        name = name[len("module.") :]
    return name


def _grad_tensors(model_chunks) -> list[torch.Tensor]:
    """The gradient storage of the model.

    DDP's flat buffers where they exist, else each parameter's ``main_grad`` or ``grad``.
    """
    tensors = []
    for chunk in model_chunks:
        buffers = list(getattr(chunk, "buffers", [])) + list(
            getattr(chunk, "expert_parallel_buffers", [])
        )
        if buffers:
            tensors += [b.grad_data for b in buffers if getattr(b, "grad_data", None) is not None]
            continue
        tensors += [g for g in map(_grad_of, chunk.parameters()) if g is not None]
    return tensors


def _local_nonfinite(model_chunks) -> torch.Tensor:
    flags = [~torch.isfinite(t).all() for t in _grad_tensors(model_chunks)]
    if NONFINITE_LOSS.flag is not None:
        flags.append(NONFINITE_LOSS.flag)
    if not flags:
        return torch.zeros((), dtype=torch.bool, device=_model_device(model_chunks))
    return torch.stack(flags).any()


def _first_nonfinite_parameter(model_chunks) -> str | None:
    bad, total, first = 0, 0, None
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            grad = _grad_of(param)
            if grad is None:
                continue
            total += 1
            if not torch.isfinite(grad).all():
                bad += 1
                first = first or _param_name(name)
    return None if first is None else f"{first} ({bad} of {total} gradient tensors)"


def _report(model_chunks, iteration: int, in_a_row: int) -> str:
    """One message from every rank's findings, built on all ranks."""
    local = {
        "rank": _rank(),
        "loss": NONFINITE_LOSS.flag is not None and bool(NONFINITE_LOSS.flag.item()),
        "site": NONFINITE_SITES.first_nonfinite(),
        "param": _first_nonfinite_parameter(model_chunks),
    }
    gathered = [local]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, local)
    loss_ranks = [g["rank"] for g in gathered if g["loss"]]
    sites = sorted((g["site"], g["rank"]) for g in gathered if g["site"])
    params = [(g["param"], g["rank"]) for g in gathered if g["param"]]
    parts = [f"iteration {iteration}: non-finite step, not applied ({in_a_row} in a row)"]
    parts.append(f"loss non-finite on rank(s) {loss_ranks}" if loss_ranks else "loss finite")
    if sites:
        site, rank = sites[0]
        parts.append(
            f"forward: first site with non-finite coefficients {site} (rank {rank}; its input "
            "streams, made by the site before it and its branch, or its own projection)"
        )
    else:
        parts.append("forward: every mHC site's coefficients finite")
    if params:
        param, rank = params[0]
        parts.append(f"backward: first parameter with a non-finite gradient {param} (rank {rank})")
    return "; ".join(parts)


def _guard_step(optimizer, model_chunks, policy: str, max_in_a_row: int) -> None:
    """Replaces ``optimizer.step`` (an instance attribute) with the non-finite guard."""
    step = optimizer.step
    state = {"in_a_row": 0}

    @functools.wraps(step)
    def guarded_step(*args, **kwargs):
        try:
            bad = _any_rank(_local_nonfinite(model_chunks))
            if not bad:
                state["in_a_row"] = 0
                return step(*args, **kwargs)
            from megatron.training import get_args

            state["in_a_row"] += 1
            message = _report(model_chunks, get_args().curr_iteration + 1, state["in_a_row"])
            if policy == "stop" or (max_in_a_row and state["in_a_row"] >= max_in_a_row):
                reason = (
                    "--nonfinite-step stop"
                    if policy == "stop"
                    else f"{state['in_a_row']} non-finite steps in a row "
                    f"(--max-nonfinite-steps-in-a-row {max_in_a_row})"
                )
                raise RunCheckError(
                    f"{message}. Stopping ({reason}); no step with non-finite values was applied "
                    "or saved. Lower the learning rate or --init-method-std, check the data, "
                    "or resume from an earlier checkpoint."
                )
            if _rank() == 0:
                print(f"warning: {message}", flush=True)
            return False, None, None
        finally:
            NONFINITE_LOSS.reset()
            NONFINITE_SITES.reset()

    optimizer.step = guarded_step


def guarded_setup_model_and_optimizer(setup, policy: str, max_in_a_row: int):
    """Megatron's ``setup_model_and_optimizer`` whose optimizer's ``step`` is guarded.

    Args:
        setup: Megatron's ``training.setup_model_and_optimizer``.
        policy: ``--nonfinite-step`` (skip or stop).
        max_in_a_row: ``--max-nonfinite-steps-in-a-row`` (0: no limit).
    """

    @functools.wraps(setup)
    def setup_model_and_optimizer(*args, **kwargs):
        model, optimizer, scheduler = setup(*args, **kwargs)
        if optimizer is not None:
            _guard_step(optimizer, model, policy, max_in_a_row)
        return model, optimizer, scheduler

    return setup_model_and_optimizer


def guarded_save(save):
    """Megatron's ``save_checkpoint`` that refuses parameters holding NaN/inf (on any rank)."""

    @functools.wraps(save)
    def save_checkpoint(iteration, model, *args, **kwargs):
        chunks = model if isinstance(model, list) else [model]
        first = None
        for chunk in chunks:
            for name, param in chunk.named_parameters():
                if not torch.isfinite(param.detach()).all():
                    first = _param_name(name)
                    break
            if first:
                break
        found = torch.tensor(first is not None, device=_model_device(chunks))
        if _any_rank(found):
            raise RunCheckError(
                f"refusing to save the checkpoint of iteration {iteration}: parameters hold "
                f"NaN/inf ({'first: ' + first if first else 'on another rank'}). The checkpoints "
                "already saved are unchanged; resume from the last one."
            )
        return save(iteration, model, *args, **kwargs)

    return save_checkpoint


def guarded_load(load):
    """Megatron's ``load_checkpoint`` whose failures name the checkpoint and what to resume."""
    from torch.distributed.checkpoint.api import CheckpointException

    @functools.wraps(load)
    def load_checkpoint(*args, **kwargs):
        try:
            return load(*args, **kwargs)
        except RunCheckError:
            raise
        except (Exception, CheckpointException) as error:  # DCP's is a BaseException
            from megatron.training import get_args

            directory = get_args().load
            detail = str(error).strip().splitlines()
            raise RunCheckError(
                f"loading the checkpoint in {directory} failed ({type(error).__name__}: "
                f"{detail[-1] if detail else ''}). A shard may be damaged or overwritten: resume "
                f"from another iteration with --ckpt-step N (iterations there: "
                f"{available_iterations(Path(directory))})."
            ) from error

    return load_checkpoint


def explained_scheduler_check(check):
    """``OptimizerParamScheduler._check_and_set`` that says which flag extends or changes a run.

    Megatron asserts there without a message.
    """

    @functools.wraps(check)
    def _check_and_set(self, cls_value, sd_value, name):
        if (
            not self.override_opt_param_scheduler
            and not self.use_checkpoint_opt_param_scheduler
            and cls_value != sd_value
        ):
            raise RunCheckError(
                f"the checkpoint's learning-rate schedule has {name} = {sd_value}, this run's "
                f"flags give {cls_value}. To extend or change a run (e.g. a larger "
                "--train-iters), pass --override-opt-param-scheduler: the schedule then follows "
                "this run's flags (with --lr-warmup-fraction the warmup grows with "
                "--train-iters; --lr-warmup-iters keeps it fixed). To keep the checkpoint's "
                "schedule, pass --use-checkpoint-opt_param-scheduler."
            )
        return check(self, cls_value, sd_value, name)

    return _check_and_set


def replace_megatron_nan_checks(args) -> None:
    """Turns Megatron's own NaN checks off and the per-site non-finite record on.

    Megatron's ``--check-for-nan-in-loss-and-grad`` re-runs the iteration, then saves the (NaN)
    model and exits; the guard of :func:`guarded_setup_model_and_optimizer` replaces it.

    Args:
        args: Megatron's parsed arguments (changed in place).
    """
    args.check_for_nan_in_loss_and_grad = False
    NONFINITE_SITES.enabled = True
