"""The step learning-rate schedule of the mHC paper (DeepSeek's).

After the linear warmup the LR stays at its peak and drops to fixed fractions of it at fixed
fractions of training (0.316x at 80%, 0.1x at 90%).

Megatron-Core 0.19.2 has no step schedule (``--lr-decay-style`` is constant, linear, cosine,
inverse-square-root or WSD). ``--lr-step-decay-fractions F1 F2 ...`` with
``--lr-step-decay-factors A1 A2 ...`` adds one on top of ``--lr-decay-style constant``: from
``Fi * lr-decay-iters`` on (``--lr-decay-iters`` defaults to ``--train-iters``), the LR is
``Ai * --lr``. Warmup and checkpointed scheduler state are Megatron's own.
"""

import argparse
import functools

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def add_step_schedule_args(parser: argparse.ArgumentParser) -> None:
    """Adds ``--lr-step-decay-fractions`` and ``--lr-step-decay-factors``."""
    group = parser.add_argument_group(title="step learning-rate schedule")
    group.add_argument(
        "--lr-step-decay-fractions", type=float, nargs="+", default=None,
        help="Fractions of --lr-decay-iters (default --train-iters) at which the learning rate "
        "steps down, increasing, in (0, 1], e.g. 0.8 0.9. Needs --lr-decay-style constant.",
    )  # fmt: skip
    group.add_argument(
        "--lr-step-decay-factors",
        type=float,
        nargs="+",
        default=None,
        help="The learning rate from each fraction on, as a factor of --lr, e.g. 0.316 0.1.",
    )


def step_milestones(args: argparse.Namespace) -> tuple[tuple[float, float], ...]:
    """The checked ``((fraction, factor), ...)`` of the parsed args; empty when not asked for.

    Raises:
        ValueError: a message naming the flag to change.
    """
    fractions, factors = args.lr_step_decay_fractions, args.lr_step_decay_factors
    if fractions is None and factors is None:
        return ()
    if fractions is None or factors is None or len(fractions) != len(factors):
        raise ValueError(
            "--lr-step-decay-fractions and --lr-step-decay-factors go together, one factor per "
            f"fraction; got {fractions} and {factors}"
        )
    increasing = all(a < b for a, b in zip(fractions, fractions[1:], strict=False))
    if not increasing or not 0 < fractions[0] or fractions[-1] > 1:
        raise ValueError(f"--lr-step-decay-fractions must increase within (0, 1]; got {fractions}")
    if any(not 0 < f <= 1 for f in factors):
        raise ValueError(f"--lr-step-decay-factors must lie in (0, 1]; got {factors}")
    if args.lr_decay_style != "constant":
        raise ValueError(
            "--lr-step-decay-fractions replaces the decay after warmup; pass "
            f"--lr-decay-style constant (got {args.lr_decay_style})"
        )
    if args.lr_warmup_fraction is not None:
        raise ValueError(
            "--lr-step-decay-fractions counts in --lr-decay-iters; give the warmup with "
            "--lr-warmup-iters instead of --lr-warmup-fraction"
        )
    decay_iters = args.lr_decay_iters or args.train_iters
    if decay_iters is not None and args.lr_warmup_iters >= decay_iters:
        # Megatron's scheduler asserts this without a message.
        raise ValueError(
            f"--lr-warmup-iters {args.lr_warmup_iters} must be below --lr-decay-iters / "
            f"--train-iters ({decay_iters}); lower the warmup or train longer"
        )
    return tuple(zip(fractions, factors, strict=True))


class StepDecayParamScheduler(OptimizerParamScheduler):
    """OptimizerParamScheduler with the step schedule.

    After warmup the LR is ``max_lr`` times the factor of the last milestone reached. Megatron
    counts steps in samples (``num_steps``, ``lr_decay_steps``); the milestones are fractions of
    ``lr_decay_steps``.
    """

    milestones: tuple[tuple[float, float], ...] = ()

    def get_lr(self, param_group: dict) -> float:
        """The learning rate of ``param_group`` at the current step."""
        if self.lr_warmup_steps > 0 and self.num_steps <= self.lr_warmup_steps:
            return super().get_lr(param_group)
        factor = 1.0
        for fraction, milestone_factor in self.milestones:
            if self.num_steps >= fraction * self.lr_decay_steps:
                factor = milestone_factor
        return param_group.get("max_lr", self.max_lr) * factor


def step_scheduler_builder(build, milestones: tuple[tuple[float, float], ...]):
    """Megatron's ``get_optimizer_param_scheduler`` building a StepDecayParamScheduler.

    Megatron builds its scheduler in ``megatron.training.training.get_optimizer_param_scheduler``
    from the global args; the wrapper re-classes what it returns (the subclass adds no state, so
    checkpoints are Megatron's own). ``megatron_patches.install`` installs it.

    Args:
        build: Megatron's ``get_optimizer_param_scheduler``.
        milestones: ``((fraction, factor), ...)`` from :func:`step_milestones`.
    """

    @functools.wraps(build)
    def build_step_scheduler(optimizer):
        scheduler = build(optimizer)
        scheduler.__class__ = StepDecayParamScheduler
        scheduler.milestones = milestones
        scheduler.step(0)  # re-apply the LR with the new rule
        return scheduler

    return build_step_scheduler
