"""The ``--mhc-*`` command-line arguments and the config built from them."""

import argparse

from megatron.training.argument_utils import ArgumentGroupFactory, core_transformer_config_from_args

from mhc_megatron.megatron.config import MHCTransformerConfig, mhc_fields, to_mhc_config
from mhc_megatron.training.schedule import add_step_schedule_args


def add_mhc_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds ``--cpu``, the step LR schedule flags (schedule.py) and one ``--mhc-*`` flag per
    MHCTransformerConfig field (help from the field's docstring, choices from its Literal type)
    to Megatron's parser."""
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
    add_step_schedule_args(parser)
    return parser


def mhc_transformer_config_from_args(args) -> MHCTransformerConfig:
    """Megatron's TransformerConfig from the parsed args, as MHC(MLA)TransformerConfig."""
    base = core_transformer_config_from_args(args)
    return to_mhc_config(base, **{f.name: getattr(args, f.name) for f in mhc_fields()})
