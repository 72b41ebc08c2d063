"""Pretrain a GPT / Mixture-of-Experts model with mHC residuals on Megatron-Core 0.19.2.

Megatron's usual arguments keep their meaning; mHC adds ``--mhc-*`` (see ``--help``) and
``--cpu`` (run on CPU with gloo). Example: ``examples/tiny/train.sh``.

The ``__main__`` guard matters: ``dist_checkpointing`` saves through a spawned multiprocessing
Manager, which re-imports this script.
"""

import os
import sys

from mhc_megatron.processes import skip_final_collection
from mhc_megatron.training import known_warnings
from mhc_megatron.training.cpu import enable_cpu_mode, with_cpu_flags

LOG_FILE_ENV = "MHC_LOG_FILE"  # set by examples/*/*.sh, which keep the output in $OUT_DIR/logs


def main() -> None:
    """Run :func:`train`; a :class:`RunCheckError` (a run that must not start or go on) or an
    invalid mHC setting becomes one message on stderr and exit code 1."""
    known_warnings.install()  # before Megatron's imports print them
    from mhc_megatron.training.run_checks import RunCheckError

    try:
        train()
    except RunCheckError as error:
        _fail(error)
    except ValueError as error:  # MHCConfigError: an mHC setting; its message says the fix
        config = sys.modules.get("mhc_megatron.megatron.config")
        if config is None or not isinstance(error, config.MHCConfigError):
            raise
        _fail(error)
    finally:
        skip_final_collection()  # the exit's last collection (bench_startup.py)


def _fail(error: Exception) -> None:
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(1)


def train() -> None:
    """Parse the arguments, check the run, and run Megatron's pretrain() on the mHC GPT model."""
    if "--cpu" in sys.argv:
        # Before parsing: validating tensor-parallel arguments already queries the GPU.
        enable_cpu_mode()
        sys.argv = with_cpu_flags(sys.argv)  # the local modules, no GPU fusions (cpu_settings.py)

    import torch
    from megatron.core.enums import ModelType
    from megatron.training import get_tokenizer, pretrain, print_rank_0
    from megatron.training.argument_utils import (
        gpt_config_from_args,
        pretrain_cfg_container_from_args,
    )
    from megatron.training.arguments import parse_and_validate_args

    from mhc_megatron.megatron.model import MHCGPTModelConfig, mhc_layer_spec
    from mhc_megatron.training import gpt_step, megatron_patches, run_checks
    from mhc_megatron.training.arguments import add_mhc_args, mhc_transformer_config_from_args
    from mhc_megatron.training.schedule import step_milestones

    args = parse_and_validate_args(extra_args_provider=add_mhc_args)
    gpt_step.check_data_paths(args)
    try:
        step_milestones(args)
    except ValueError as error:
        sys.exit(f"error: {error}")
    # The checkpoint, the model it holds, the data and the run lock, before any process group:
    # a refusal exits 1 on every rank, with nothing written.
    for note in run_checks.check_run(args, get_tokenizer().vocab_size):
        print_rank_0(note)
    config = mhc_transformer_config_from_args(args)
    # Every change to Megatron's own functions, in one place (training/megatron_patches.py).
    megatron_patches.install(args, config.mhc_enabled, config.mhc_diagnostics_interval)
    model_cfg = gpt_config_from_args(args, config=config, model_config_cls=MHCGPTModelConfig)
    if model_cfg.transformer_layer_spec is None:  # --spec given: the user's spec wins
        model_cfg.transformer_layer_spec = mhc_layer_spec
    cfg_container = pretrain_cfg_container_from_args(args, model_cfg)
    try:
        pretrain(
            cfg_container,
            gpt_step.train_valid_test_datasets_provider,
            ModelType.encoder_or_decoder,
            gpt_step.forward_step,
        )
    except SystemExit as stop:  # Megatron's exit paths (--exit-interval, signals) end this way
        if stop.code not in (None, 0):
            raise
    print_rank_0(where_outputs_are(args))
    # Left to static destructors, gloo's threads sometimes abort the process at exit.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def where_outputs_are(args) -> str:
    """The run's last line: where its checkpoints, TensorBoard events and log are."""
    from mhc_megatron.training.run_checks import TRACKER

    parts = []
    if args.save:
        tracker = os.path.join(args.save, TRACKER)
        latest = ""
        if os.path.isfile(tracker):
            with open(tracker) as f:
                latest = f" (latest: iteration {f.read().strip()})"
        parts.append(f"checkpoints in {args.save}{latest}")
    else:
        parts.append("no checkpoints (no --save)")
    if args.tensorboard_dir:
        parts.append(f"TensorBoard events in {args.tensorboard_dir}")
    log = os.environ.get(LOG_FILE_ENV)
    parts.append(f"log in {log}" if log else "log: this output only (not saved)")
    return "> run ended: " + "; ".join(parts)


if __name__ == "__main__":
    main()
