"""The GPT training step that Megatron's ``pretrain()`` is given (megatron-core 0.19.2).

Megatron-LM's ``pretrain_gpt.py`` is not part of the megatron-core wheel; this module provides the
same four pieces for ``megatron.training.pretrain(cfg_container, datasets_provider, model_type,
forward_step)``:

- :func:`get_batch`: one micro-batch, read on tensor-parallel rank 0 and broadcast to the others.
- :func:`loss_func`: masked token-loss sum, token count and the ``lm loss`` report.
- :func:`forward_step`: batch -> model -> ``(output, partial(loss_func, ...))``.
- :func:`train_valid_test_datasets_provider`: ``GPTDataset`` (or ``MockGPTDataset`` with
  ``--mock-data``) through ``BlendedMegatronDatasetBuilder``, configured from Megatron's arguments.

:func:`check_data_paths` fails early, with a message that says what to pass instead, when a
``--data-path`` prefix has no ``.bin``/``.idx`` on disk.

Shapes use ``b`` micro-batch size and ``s`` sequence length. Batches are ``[b, s]`` (batch first,
as the data loader yields them); the model turns them into ``[s, b, C]`` activations itself.

Nothing here is CUDA-specific: tensors go to the current CUDA device when CUDA is available and
stay on the CPU otherwise (which is what ``mhc_megatron.training.cpu.enable_cpu_mode`` arranges).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.rerun_state_machine import get_rerun_state_machine
from megatron.core.transformer.multi_token_prediction import mtp_on_this_rank
from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout
from megatron.core.utils import (
    get_attr_wrapped_model,
    get_batch_on_this_cp_rank,
    get_batch_on_this_tp_rank,
)
from megatron.training import get_args, get_timers, get_tokenizer, print_rank_0
from megatron.training.utils import get_blend_and_blend_per_split, is_first_or_last_pipeline_stage

from mhc_megatron.training.guards import NONFINITE_LOSS
from mhc_megatron.training.run_checks import check_batch_token_ids, data_prefixes

# A loss this many times the largest loss seen so far counts as a spike (as in pretrain_gpt.py).
SPIKY_LOSS_FACTOR = 10

# Keys get_batch_on_this_tp_rank() expects in the batch dict on tensor-parallel rank 0.
_BATCH_KEYS = (
    "tokens",
    "labels",
    "loss_mask",
    "position_ids",
    "attention_mask",
    "cu_seqlens",
    "cu_seqlens_padded",
    "max_seqlen",
    "local_cp_size",
)


def _device() -> torch.device:
    """The device the batch goes to: the current GPU, or the CPU when CUDA is unavailable."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _mtp_on_this_rank(args, vp_stage: int | None) -> bool:
    """Whether multi-token-prediction layers live on this pipeline stage (they need labels)."""
    if args.mtp_num_layers is None:
        return False
    layout = args.pipeline_model_parallel_layout
    if isinstance(layout, str):
        layout = PipelineParallelLayerLayout(layout, args.pipeline_model_parallel_size)
    return mtp_on_this_rank(
        layout=layout,
        mtp_num_layers=args.mtp_num_layers,
        ignore_virtual=vp_stage is None,
        vp_stage=vp_stage,
    )


def get_batch(data_iterator: Iterator[dict] | None, vp_stage: int | None = None) -> tuple:
    """Read one micro-batch and give every tensor-parallel rank the same copy.

    Tensor-parallel rank 0 of the first and last pipeline stages draws the batch from the data
    iterator; ``get_batch_on_this_tp_rank`` broadcasts it over the tensor-parallel group, and
    ``get_batch_on_this_cp_rank`` keeps this context-parallel rank's slice of the sequence.
    Intermediate pipeline stages need no data (their input arrives through p2p).

    Args:
        data_iterator: Yields dicts of ``[b, s]`` tensors (``tokens``, ``labels``, ``loss_mask``,
            ``position_ids``, optionally ``attention_mask`` ``[b, 1, s, s]``). Only read on
            tensor-parallel rank 0; may be None elsewhere.
        vp_stage: Virtual pipeline stage of the model chunk asking, or None without VPP.

    Returns:
        ``(tokens, labels, loss_mask, attention_mask, position_ids)``: ``tokens``/``labels``/
        ``position_ids`` int64 ``[b, s/cp]``, ``loss_mask`` float ``[b, s/cp]``,
        ``attention_mask`` bool ``[b, 1, s/cp, s]`` or None. Entries a stage does not need are
        None (all five on intermediate pipeline stages; labels and loss mask on a first stage
        that is not also the last, tokens and position ids on a last stage that is not first).
    """
    if not is_first_or_last_pipeline_stage(vp_stage):
        return None, None, None, None, None

    args = get_args()
    if args.sft or args.dataloader_inter_document_masking or args.hybrid_context_parallel:
        raise NotImplementedError(
            "mhc_megatron's GPT step supports plain pretraining batches only; drop --sft, "
            "--dataloader-inter-document-masking and --hybrid-context-parallel."
        )

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    batch: dict[str, Any] = {}
    if tp_rank == 0:
        data = next(data_iterator)
        check_batch_token_ids(data, get_tokenizer().vocab_size, args.tokenizer_type)
        device = _device()
        for key in _BATCH_KEYS:
            value = data.get(key)
            batch[key] = None if value is None else value.to(device, non_blocking=True)

    ignore_virtual = vp_stage is None
    batch = get_batch_on_this_tp_rank(
        batch,
        has_cu_seqlens=False,
        is_hybrid_cp=False,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        broadcast_src_rank=parallel_state.get_tensor_model_parallel_src_rank(),
        broadcast_group=parallel_state.get_tensor_model_parallel_group(),
        cp_size=args.context_parallel_size,
        tp_rank=tp_rank,
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        mtp_on_this_rank=_mtp_on_this_rank(args, vp_stage),
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=parallel_state.is_pipeline_first_stage(
            ignore_virtual=ignore_virtual, vp_stage=vp_stage
        ),
        is_pipeline_last_stage=parallel_state.is_pipeline_last_stage(
            ignore_virtual=ignore_virtual, vp_stage=vp_stage
        ),
    )
    batch = get_batch_on_this_cp_rank(
        batch, is_hybrid_cp=False, cp_group=parallel_state.get_context_parallel_group()
    )
    return (
        batch["tokens"],
        batch["labels"],
        batch["loss_mask"],
        batch["attention_mask"],
        batch["position_ids"],
    )


def loss_func(
    loss_mask: torch.Tensor, output_tensor: torch.Tensor, model: torch.nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Masked sum of the per-token losses of one micro-batch.

    Megatron's schedule divides by the token count summed over micro-batches and data-parallel
    (and context-parallel) ranks, so this returns a sum and a count rather than a mean.

    Args:
        loss_mask: ``[b, s]`` (or ``[b, s/cp]``) weights, 1 for tokens that count, 0 otherwise.
        output_tensor: ``[b, s]`` per-token cross-entropy from ``GPTModel`` given labels.
        model: The (possibly wrapped) model; unused here, accepted for pretrain_gpt's signature.

    Returns:
        ``(loss, num_tokens, report)``: ``loss`` float32 scalar, the masked sum; ``num_tokens``
        int scalar, the mask's sum; ``report`` ``{"lm loss": [loss, num_tokens]}`` (a ``[2]``
        tensor that Megatron reduces across ranks and logs as ``lm loss``).
    """
    del model
    args = get_args()
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}

    # Noted on this rank before the data-parallel all-reduce spreads a NaN everywhere: the run
    # guard (guards.py) then skips the step. It replaces Megatron's NaN check, which re-ran the
    # iteration and then saved the model (megatron_patches.install turns that flag off).
    NONFINITE_LOSS.note(loss)
    rerun_state_machine = get_rerun_state_machine()
    if args.check_for_spiky_loss:
        rerun_state_machine.validate_result(
            result=loss,
            rejection_func=partial(
                rerun_state_machine.is_unexpectedly_large,
                threshold=SPIKY_LOSS_FACTOR,
                context="loss",
            ),
            message="Spiky loss",
            tolerance=0.0,  # the forward pass is deterministic
            fatal=False,
        )
    return loss, num_tokens, report


def forward_step(data_iterator, model: torch.nn.Module, return_schedule_plan: bool = False):
    """Run the model on one micro-batch.

    Args:
        data_iterator: The iterator :func:`get_batch` reads from.
        model: The GPT model chunk (possibly wrapped in DDP / Float16Module).
        return_schedule_plan: Return the model's schedule plan instead of its output (only with
            ``--overlap-moe-expert-parallel-comm``).

    Returns:
        ``(output_tensor, loss_fn)``: on the last pipeline stage ``output_tensor`` is the
        ``[b, s]`` per-token loss, elsewhere the hidden states sent on (``[s, b, n*C]`` with
        mHC streams, ``[s, b, C]`` for the residual variant);
        ``loss_fn(output_tensor)`` is :func:`loss_func` bound to this batch's loss mask. With
        ``return_schedule_plan`` the first element is the schedule plan instead.
    """
    args = get_args()
    timers = get_timers()

    timers("batch-generator", log_level=2).start()
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator, vp_stage)
    timers("batch-generator").stop()

    if return_schedule_plan:
        if not args.overlap_moe_expert_parallel_comm:
            raise ValueError("return_schedule_plan=True needs --overlap-moe-expert-parallel-comm.")
        schedule_plan = model.build_schedule_plan(
            tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask
        )
        return schedule_plan, partial(loss_func, loss_mask, model=model)

    output_tensor = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
    return output_tensor, partial(loss_func, loss_mask, model=model)


def is_dataset_built_on_rank(vp_stage: int | None = None) -> bool:
    """Datasets are built where batches are read: TP rank 0 of the first and last PP stages."""
    return (
        is_first_or_last_pipeline_stage(vp_stage)
        and parallel_state.get_tensor_model_parallel_rank() == 0
    )


def check_data_paths(args) -> None:
    """Fail with a clear message if a data prefix has no ``.bin``/``.idx`` on disk.

    Megatron itself only fails deep inside dataset building (after the model is built) with a
    bare file-not-found from the index reader. Object-storage prefixes (``s3://``, ``msc://``)
    are not checked. Nothing is checked with ``--mock-data``.

    Args:
        args: Megatron's parsed arguments (``--data-path``, ``--train-data-path``, ...).

    Raises:
        FileNotFoundError: Naming every missing file and what to pass instead.
    """
    if args.mock_data:
        return
    prefixes = data_prefixes(args)
    if not prefixes:
        raise FileNotFoundError(
            "No training data given: pass --data-path PREFIX (a dataset written by "
            "tools/preprocess_data.py, without .bin/.idx) or --mock-data for synthetic tokens."
        )
    missing = []
    for prefix in prefixes:
        if prefix.startswith(("s3://", "msc://")):
            continue
        missing += [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
    if missing:
        raise FileNotFoundError(
            "Data files not found: "
            + ", ".join(missing)
            + ". --data-path takes the PREFIX of an indexed dataset (the path without the "
            ".bin/.idx suffix, e.g. data/corpus_text_document for data/corpus_text_document.bin "
            "and .idx written by tools/preprocess_data.py); pass an existing prefix, or "
            "--mock-data to train on synthetic tokens."
        )


def core_gpt_dataset_config_from_args(args) -> GPTDatasetConfig:
    """Build the ``GPTDatasetConfig`` that Megatron's arguments describe.

    Args:
        args: Megatron's parsed arguments.

    Returns:
        The dataset config: ``sequence_length = --seq-length`` tokens per sample (each sample
        holds ``s + 1`` tokens, inputs and shifted labels), the blend (or per-split blends), the
        train/valid/test ``--split``, the tokenizer and the mask/position-id options.
    """
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    sequences_per_dataset = None
    if args.per_dataset_sequences_path is not None:
        with open(args.per_dataset_sequences_path) as f:
            sequences_per_dataset = json.load(f)
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        multiple_validation_sets=args.multiple_validation_sets,
        full_validation=args.full_validation,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        object_storage_cache_path=args.object_storage_cache_path,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
        allow_ambiguous_pad_tokens=args.allow_ambiguous_pad_tokens,
        fast_cache_load=args.dataloader_fast_cache_load,
        sequences_per_dataset=sequences_per_dataset,
        defer_npy_index_mmap=args.dataloader_defer_npy_index_mmap,
        context_parallel_size=args.context_parallel_size,
        data_parallel_size=args.data_parallel_size,
        sequence_parallel_size=args.tensor_model_parallel_size if args.sequence_parallel else 0,
    )


def train_valid_test_datasets_provider(
    train_val_test_num_samples: list[int], vp_stage: int | None = None
) -> tuple:
    """Build the train, validation and test datasets.

    Args:
        train_val_test_num_samples: How many samples (sequences of ``s`` tokens) each split must
            provide: ``[train, valid, test]``.
        vp_stage: Virtual pipeline stage the datasets are for, or None without VPP.

    Returns:
        ``(train, valid, test)`` datasets; None on ranks that read no data (see
        :func:`is_dataset_built_on_rank`) and for splits with no samples.
    """
    args = get_args()
    check_data_paths(args)
    if args.sft or args.fim_data:
        raise NotImplementedError(
            "mhc_megatron's GPT step builds GPTDataset / MockGPTDataset only; "
            "drop --sft and --fim-data."
        )
    config = core_gpt_dataset_config_from_args(args)
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset

    print_rank_0("> building train, validation, and test datasets for GPT ...")
    train_ds, valid_ds, test_ds = BlendedMegatronDatasetBuilder(
        dataset_type,
        train_val_test_num_samples,
        partial(is_dataset_built_on_rank, vp_stage=vp_stage),
        config,
    ).build()
    print_rank_0("> finished creating GPT datasets ...")
    return train_ds, valid_ds, test_ds


# Every rank calls the provider; BlendedMegatronDatasetBuilder builds only where
# is_dataset_built_on_rank() says so (what pretrain_gpt.py sets in its __main__).
train_valid_test_datasets_provider.is_distributed = True
