"""Every run-time change mhc_megatron makes to Megatron-Core 0.19.2, installed by one call.

``pretrain_mhc.py`` calls :func:`install` once, after Megatron parsed the arguments and before
``pretrain()``. Nothing else in the package replaces a Megatron attribute: building a model
changes nothing global, and the wrappers themselves live next to what they add (``guards.py``,
``schedule.py``, ``stability_log.py``, ``megatron/pipeline.py``). The one exception is CPU mode
(``--cpu``), whose own version-pinned list is in ``cpu.py``.

The patches (line numbers of megatron-core 0.19.2; :data:`PATCHES` holds the same list):

==========================================  =================================================
Megatron attribute replaced                 why, and when it is installed
==========================================  =================================================
``P2PCommunicator._communicate``            pipeline receive buffers are ``[s, b, n*C]``, not
(p2p_communication.py:275)                  ``[s, b, C]``; mHC with pipeline parallelism
``training.train_step`` (training.py:2336)  records the stability diagnostics every
                                            ``--mhc-diagnostics-interval`` iterations
``training.get_optimizer_param_scheduler``  the paper's step LR schedule;
(training.py:1906)                          ``--lr-step-decay-fractions``
``training.setup_model_and_optimizer``      wraps ``optimizer.step`` with the non-finite
(training.py:2017)                          guard; always
``training.save_checkpoint``                refuses to save parameters holding NaN/inf;
(checkpointing.py:552)                      always
``training.load_checkpoint``                a failed load names the checkpoint and the
(checkpointing.py:2066)                     iterations to resume from; always
``OptimizerParamScheduler._check_and_set``  a changed LR schedule on resume says which flag
(optimizer_param_scheduler.py:318)          to pass instead of a bare assertion; always
==========================================  =================================================

Each patch wraps the attribute Megatron had before the first :func:`install`; installing again
(tests call ``pretrain_mhc.main()`` more than once in a process) first puts every original back,
then installs what the new run needs: never a wrapper of a wrapper. :func:`installed` lists
what is in place (``MHC_LIST_PATCHES=1`` prints it at start-up) and :func:`uninstall` restores
Megatron.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mhc_megatron.training import guards
from mhc_megatron.training.schedule import step_milestones, step_scheduler_builder
from mhc_megatron.training.stability_log import train_step_with_diagnostics

LIST_ENV = "MHC_LIST_PATCHES"  # set: print the installed patches at start-up


@dataclass(frozen=True)
class Patch:
    """One replaced Megatron attribute.

    Attributes:
        replaces: the Megatron definition replaced (file and line in megatron-core 0.19.2).
        why: what the replacement adds.
    """

    replaces: str
    why: str


PATCHES: dict[str, Patch] = {
    "P2PCommunicator._communicate": Patch(
        "core/pipeline_parallel/p2p_communication.py:275",
        "pipeline stages send and receive the n streams [s, b, n*C] (megatron/pipeline.py)",
    ),
    "training.train_step": Patch(
        "training/training.py:2336",
        "records the mHC stability diagnostics every --mhc-diagnostics-interval iterations "
        "(training/diagnostics.py)",
    ),
    "training.get_optimizer_param_scheduler": Patch(
        "training/training.py:1906",
        "builds the step LR schedule of --lr-step-decay-fractions (training/schedule.py)",
    ),
    "training.setup_model_and_optimizer": Patch(
        "training/training.py:2017",
        "wraps optimizer.step with the non-finite guard: no NaN/inf step is applied "
        "(training/guards.py)",
    ),
    "training.save_checkpoint": Patch(
        "training/checkpointing.py:552 (as imported by training.py)",
        "refuses to save parameters that hold NaN/inf (training/guards.py)",
    ),
    "training.load_checkpoint": Patch(
        "training/checkpointing.py:2066 (as imported by training.py)",
        "a failed load names the checkpoint and the iterations to resume from (training/guards.py)",
    ),
    "OptimizerParamScheduler._check_and_set": Patch(
        "core/optimizer_param_scheduler.py:318",
        "a changed LR schedule on resume names the flag to pass instead of a bare assertion "
        "(training/guards.py)",
    ),
}

# (owner, attribute name) -> Megatron's original, kept across installs.
_originals: dict[tuple[Any, str], Any] = {}
_installed: list[str] = []


def _replace(name: str, owner: Any, attribute: str, wrap: Callable[[Any], Any]) -> None:
    """Sets ``owner.attribute = wrap(original)``, ``original`` being Megatron's own."""
    original = _originals.setdefault((owner, attribute), getattr(owner, attribute))
    setattr(owner, attribute, wrap(original))
    if name not in _installed:
        _installed.append(name)


def install(args: argparse.Namespace, mhc_enabled: bool, diagnostics_interval: int) -> None:
    """Installs the patches this run needs and the settings that go with them.

    Args:
        args: Megatron's parsed arguments (``--nonfinite-step``,
            ``--max-nonfinite-steps-in-a-row``, the step schedule flags, the parallel sizes).
        mhc_enabled: the model runs on n streams (variant hc or mhc).
        diagnostics_interval: ``--mhc-diagnostics-interval`` (0: no diagnostics).

    Raises:
        ValueError: a step schedule flag is wrong (the message names it).
        RuntimeError: the installed Megatron-Core is not the one the pipeline patch targets.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.training import training

    milestones = step_milestones(args)  # validates before anything is replaced
    _restore()  # a second install reflects its own run only
    if mhc_enabled and args.pipeline_model_parallel_size > 1:
        install_pipeline_streams()
    if mhc_enabled and diagnostics_interval > 0:
        _replace(
            "training.train_step",
            training,
            "train_step",
            lambda step: train_step_with_diagnostics(step, diagnostics_interval),
        )
    if milestones:
        _replace(
            "training.get_optimizer_param_scheduler",
            training,
            "get_optimizer_param_scheduler",
            lambda build: step_scheduler_builder(build, milestones),
        )
    policy, max_in_a_row = args.nonfinite_step, args.max_nonfinite_steps_in_a_row
    _replace(
        "training.setup_model_and_optimizer",
        training,
        "setup_model_and_optimizer",
        lambda setup: guards.guarded_setup_model_and_optimizer(setup, policy, max_in_a_row),
    )
    _replace("training.save_checkpoint", training, "save_checkpoint", guards.guarded_save)
    _replace("training.load_checkpoint", training, "load_checkpoint", guards.guarded_load)
    _replace(
        "OptimizerParamScheduler._check_and_set",
        OptimizerParamScheduler,
        "_check_and_set",
        guards.explained_scheduler_check,
    )
    guards.replace_megatron_nan_checks(args)
    if os.environ.get(LIST_ENV, "") not in ("", "0"):
        print("\n".join(["> Megatron patches installed:", *installed()]), flush=True)


def install_pipeline_streams() -> None:
    """Makes pipeline stages send and receive ``[s, b, n*C]`` for mHC models.

    :func:`install` calls it for mHC runs with pipeline parallelism; a script or test that
    builds pipeline stages itself (``build_mhc_gpt_model``) calls it first. Other models in the
    process are untouched: the buffer shape changes only for communicators with an mHC config.

    Raises:
        RuntimeError: the installed Megatron-Core is not the one the patch targets.
    """
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    from mhc_megatron.megatron.pipeline import communicate_with_stream_shapes

    name = "P2PCommunicator._communicate"
    _replace(name, P2PCommunicator, "_communicate", communicate_with_stream_shapes)


def installed() -> list[str]:
    """The patches in place, each as ``name (replaces ...): why``."""
    return [f"  {name} ({PATCHES[name].replaces}): {PATCHES[name].why}" for name in _installed]


def _restore() -> None:
    for (owner, attribute), original in _originals.items():
        setattr(owner, attribute, original)
    _installed.clear()


def uninstall() -> None:
    """Puts Megatron's own attributes back (tests; a process that goes on without mHC)."""
    _restore()
    _originals.clear()
    guards.NONFINITE_SITES.enabled = False
