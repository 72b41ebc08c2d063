"""The ``--mhc-*`` command-line arguments and the config built from them."""

import argparse
import re

from megatron.training.argument_utils import ArgumentGroupFactory, core_transformer_config_from_args

from mhc_megatron.megatron.config import MHCTransformerConfig, mhc_fields, to_mhc_config
from mhc_megatron.training.schedule import add_step_schedule_args

# A help string is %-formatted by argparse: "%(name)s" and "%%" are its, any other "%" breaks it.
_PERCENT = re.compile(r"%(\([^)]*\)[a-zA-Z]|%)?")


def _escape_bare_percents(parser: argparse.ArgumentParser) -> None:
    """Makes ``--help`` work by escaping the bare ``%`` in the parser's help strings.

    Megatron 0.19.2's help of ``--moe-paged-stash-buffer-size-factor-cuda`` ends in a bare
    ``10%)``, and argparse raises ``ValueError: unsupported format character`` on it, so
    ``pretrain_mhc.py --help`` crashed.
    """
    for action in parser._actions:
        if action.help:
            action.help = _PERCENT.sub(lambda m: m.group(0) if m.group(1) else "%%", action.help)


def add_mhc_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the mhc_megatron flags to Megatron's parser.

    ``--cpu``, the step LR schedule flags (schedule.py) and one ``--mhc-*`` flag per
    MHCTransformerConfig field (help from the field's docstring, choices from its Literal type).
    """
    _escape_bare_percents(parser)
    names = {f.name for f in mhc_fields()}
    excluded = [f for f in MHCTransformerConfig.__dataclass_fields__ if f not in names]
    ArgumentGroupFactory(MHCTransformerConfig, exclude=excluded).build_group(parser, "mHC")
    group = parser.add_argument_group(title="mhc_megatron")
    group.add_argument(
        "--cpu",
        action="store_true",
        help="Run on CPU with gloo (redirects Megatron-Core's hard-coded CUDA calls; "
        "see mhc_megatron/training/cpu.py). Never active on a GPU run.",
    )
    group.add_argument(
        "--nonfinite-step",
        choices=("skip", "stop"),
        default="skip",
        help="A step whose loss or gradients hold NaN/inf is never applied: skip it (Megatron "
        "counts a skipped iteration) or stop the run with exit code 1. Either way the first site "
        "and parameter that went non-finite are named (mhc_megatron/training/guards.py).",
    )
    group.add_argument(
        "--max-nonfinite-steps-in-a-row",
        type=int,
        default=10,
        help="Stop (exit 1) after this many skipped non-finite steps in a row; 0: never.",
    )
    group.add_argument(
        "--allow-checkpoint-model-change",
        action="store_true",
        help="Load a checkpoint whose model settings differ from this run's (fine-tuning "
        "another model; the shapes must still match). Without it such a --load is refused "
        "with the list of differences (mhc_megatron/training/run_checks.py).",
    )
    add_step_schedule_args(parser)
    return parser


def mhc_transformer_config_from_args(args) -> MHCTransformerConfig:
    """Megatron's TransformerConfig from the parsed args, as MHC(MLA)TransformerConfig.

    Built (and validated) once: Megatron's builder takes the mHC class and reads its mhc_*
    fields from the args. With --multi-latent-attention (or heterogeneous layers) Megatron
    swaps in its own class whatever it is given, so that config is rebuilt as the mHC one.

    Args:
        args: Megatron's parsed arguments, with the ``--mhc-*`` flags.
    """
    if args.multi_latent_attention or getattr(args, "heterogeneous_layers_config_path", None):
        base = core_transformer_config_from_args(args)
        return to_mhc_config(base, **{f.name: getattr(args, f.name) for f in mhc_fields()})
    return core_transformer_config_from_args(args, config_class=MHCTransformerConfig)
