"""``mhc_megatron/training/megatron_patches.py``: the one place Megatron is changed at run time.

Each run installs exactly the patches it needs, each wrapping Megatron's own function (never a
previous wrapper), ``installed()`` lists them with the Megatron line they replace, and
``uninstall()`` gives Megatron back. Nothing is replaced when an argument is refused.
"""

from types import SimpleNamespace

import pytest
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.training import training

from mhc_megatron.megatron.diagnostics import NONFINITE_SITES
from mhc_megatron.training import megatron_patches

ALWAYS = [
    "training.setup_model_and_optimizer",
    "training.save_checkpoint",
    "training.load_checkpoint",
    "OptimizerParamScheduler._check_and_set",
]
TARGETS = {
    "P2PCommunicator._communicate": (P2PCommunicator, "_communicate"),
    "training.train_step": (training, "train_step"),
    "training.get_optimizer_param_scheduler": (training, "get_optimizer_param_scheduler"),
    "training.setup_model_and_optimizer": (training, "setup_model_and_optimizer"),
    "training.save_checkpoint": (training, "save_checkpoint"),
    "training.load_checkpoint": (training, "load_checkpoint"),
    "OptimizerParamScheduler._check_and_set": (OptimizerParamScheduler, "_check_and_set"),
}


def _args(**overrides):
    args = dict(
        nonfinite_step="skip", max_nonfinite_steps_in_a_row=10, pipeline_model_parallel_size=1,
        lr_step_decay_fractions=None, lr_step_decay_factors=None, lr_decay_style="constant",
        lr_warmup_fraction=None, lr_warmup_iters=0, lr_decay_iters=None, train_iters=100,
        check_for_nan_in_loss_and_grad=True,
    )  # fmt: skip
    args.update(overrides)
    return SimpleNamespace(**args)


@pytest.fixture
def megatron_originals():
    originals = {name: getattr(*target) for name, target in TARGETS.items()}
    yield originals
    megatron_patches.uninstall()
    for name, (owner, attribute) in TARGETS.items():
        assert getattr(owner, attribute) is originals[name], f"{name} not given back"


def test_every_patch_is_listed_with_the_line_it_replaces():
    assert set(megatron_patches.PATCHES) == set(TARGETS)
    for name, patch in megatron_patches.PATCHES.items():
        assert patch.replaces.split(":")[0].endswith(".py") and patch.why, name
        assert name in megatron_patches.__doc__  # the module's table names each one


def test_a_run_installs_what_it_needs_and_reinstalling_starts_from_megatron(
    megatron_originals, capsys, monkeypatch
):
    """A plain run gets the four guards; mHC with pipeline stages, diagnostics and the step
    schedule add theirs; a second install (another run in the process) drops what it does not
    need and wraps Megatron's functions, not the first run's wrappers."""
    args = _args()
    megatron_patches.install(args, mhc_enabled=True, diagnostics_interval=0)
    assert [line.split(" (")[0].strip() for line in megatron_patches.installed()] == ALWAYS
    assert args.check_for_nan_in_loss_and_grad is False and NONFINITE_SITES.enabled

    monkeypatch.setenv(megatron_patches.LIST_ENV, "1")
    full = _args(
        pipeline_model_parallel_size=2,
        lr_step_decay_fractions=[0.8, 0.9],
        lr_step_decay_factors=[0.316, 0.1],
    )
    megatron_patches.install(full, mhc_enabled=True, diagnostics_interval=5)
    names = {line.split(" (")[0].strip() for line in megatron_patches.installed()}
    assert names == set(TARGETS)
    printed = capsys.readouterr().out
    assert "> Megatron patches installed:" in printed and "training/training.py:2336" in printed
    for name, (owner, attribute) in TARGETS.items():
        assert getattr(owner, attribute).__wrapped__ is megatron_originals[name], name

    monkeypatch.delenv(megatron_patches.LIST_ENV)
    megatron_patches.install(_args(pipeline_model_parallel_size=2), False, 5)  # residual model
    assert [line.split(" (")[0].strip() for line in megatron_patches.installed()] == ALWAYS
    assert training.train_step is megatron_originals["training.train_step"]
    assert P2PCommunicator._communicate is megatron_originals["P2PCommunicator._communicate"]


def test_a_refused_schedule_replaces_nothing(megatron_originals):
    with pytest.raises(ValueError, match="--lr-step-decay-factors go together"):
        megatron_patches.install(_args(lr_step_decay_fractions=[0.5]), True, 0)
    assert megatron_patches.installed() == []
    for name, (owner, attribute) in TARGETS.items():
        assert getattr(owner, attribute) is megatron_originals[name]
