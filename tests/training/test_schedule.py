"""The step learning-rate schedule of the paper recipes (``mhc_megatron/training/schedule.py``):
``StepDecayParamScheduler``'s learning rate over warmup and the decay milestones, and
``step_milestones``' errors for flags that do not fit together. The schedule in a real training
run is checked by ``tests/e2e/test_recipes.py``."""

from types import SimpleNamespace

import pytest


def _scheduler(milestones, warmup=4, decay=100, max_lr=1.0):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from mhc_megatron.training.schedule import StepDecayParamScheduler

    scheduler = StepDecayParamScheduler.__new__(StepDecayParamScheduler)
    # Only what get_lr reads: the base class's __init__ wants an optimizer.
    scheduler.max_lr, scheduler.init_lr, scheduler.min_lr = max_lr, 0.0, 0.0
    scheduler.lr_warmup_steps, scheduler.lr_decay_steps = warmup, decay
    scheduler.milestones = milestones
    assert isinstance(scheduler, OptimizerParamScheduler)
    return scheduler


def test_step_schedule_values():
    scheduler = _scheduler(((0.8, 0.316), (0.9, 0.1)))
    lrs = {}
    for step in (2, 4, 5, 79, 80, 89, 90, 100, 120):
        scheduler.num_steps = step
        lrs[step] = scheduler.get_lr({})
    assert lrs[2] == pytest.approx(0.5)  # Megatron's linear warmup
    assert lrs[4] == lrs[5] == lrs[79] == 1.0
    assert lrs[80] == lrs[89] == 0.316
    assert lrs[90] == lrs[100] == lrs[120] == 0.1
    scheduler.num_steps = 85
    assert scheduler.get_lr({"max_lr": 2.0}) == pytest.approx(0.632)  # per-group max LR


@pytest.mark.parametrize(
    "fractions, factors, style, message",
    [
        ([0.8, 0.9], [0.316], "constant", "one factor per fraction"),
        ([0.9, 0.8], [0.316, 0.1], "constant", "must increase"),
        ([0.8, 1.2], [0.316, 0.1], "constant", "must increase within"),
        ([0.8], [1.5], "constant", r"factors must lie in \(0, 1\]"),
        ([0.8], [0.316], "cosine", "pass --lr-decay-style constant"),
        (None, [0.316], "constant", "go together"),
    ],
)
def test_step_schedule_bad_flags_say_what_to_change(fractions, factors, style, message):
    from mhc_megatron.training.schedule import step_milestones

    args = SimpleNamespace(
        lr_step_decay_fractions=fractions, lr_step_decay_factors=factors,
        lr_decay_style=style, lr_warmup_fraction=None, lr_warmup_iters=10, lr_decay_iters=None,
        train_iters=100,
    )  # fmt: skip
    with pytest.raises(ValueError, match=message):
        step_milestones(args)
