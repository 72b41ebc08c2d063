"""A plain-GPT launcher for the CPU-mode tests: Megatron's ``pretrain()`` with mhc_megatron's step.

Used only by ``tests/test_cpu_mode.py`` (launched with torchrun). It is the same pattern as
``pretrain_mhc.py`` without mHC: parse Megatron's arguments (plus ``--cpu``), build the stock
``GPTModelConfig`` and the config container, and call ``pretrain``.

``enable_cpu_mode()`` runs before argument parsing because validating tensor-parallel arguments
already queries the GPU. The ``__main__`` guard matters: ``dist_checkpointing`` saves through a
spawned multiprocessing Manager, which re-imports this script.
"""

import sys

from mhc_megatron.training.cpu import enable_cpu_mode


def _add_cpu_arg(parser):
    """Add ``--cpu`` (the value is only read from ``sys.argv``, before parsing)."""
    group = parser.add_argument_group(title="mhc_megatron")
    group.add_argument(
        "--cpu", action="store_true", help="Run on CPU with gloo (mhc_megatron CPU mode)."
    )
    return parser


def main() -> None:
    """Parse the arguments and run Megatron's pretrain() on a stock GPT model."""
    if "--cpu" in sys.argv:
        enable_cpu_mode()

    # Imported here, not at the top: the checkpoint Manager process re-imports this file.
    import torch
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import (
        gpt_config_from_args,
        pretrain_cfg_container_from_args,
    )
    from megatron.training.arguments import parse_and_validate_args

    from mhc_megatron.training import gpt_step

    args = parse_and_validate_args(extra_args_provider=_add_cpu_arg)
    gpt_step.check_data_paths(args)
    model_cfg = gpt_config_from_args(args)
    cfg_container = pretrain_cfg_container_from_args(args, model_cfg)
    pretrain(
        cfg_container,
        gpt_step.train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        gpt_step.forward_step,
    )
    # Tear the process groups down before interpreter exit: left to static destructors, gloo's
    # threads sometimes abort the process ("terminate called without an active exception").
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
