"""Checks of the training data: the indexed ``.bin``/``.idx`` files, token ids and splits.

:func:`read_index`, :func:`check_token_ids` and :func:`check_split`: ``.bin``/``.idx`` agree,
token ids are below the vocabulary, and no split with a non-zero weight gets zero documents
(Megatron's GPTDataset loops forever on an empty split). :func:`check_data` runs them on every
dataset of the run. :func:`check_batch_token_ids` does the token check again on every batch
``get_batch`` reads.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mhc_megatron.training.run_check_error import RunCheckError

# Token scan of the .bin on rank 0: every byte up to this size, evenly spaced windows beyond
# (get_batch also checks every batch it reads).
FULL_SCAN_BYTES = 1 << 30
SCAN_WINDOWS = 64
_IDX_HEADER = b"MMIDIDX\x00\x00"
_IDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
               7: np.float32, 8: np.uint16}  # fmt: skip


@dataclass
class IndexedDatasetInfo:
    """What the ``.idx`` of an indexed dataset says (and the ``.bin`` agrees with).

    Attributes:
        documents: number of documents.
        sequences: number of sequences.
        dtype: token dtype.
        tokens_before_document: ``[documents + 1]`` int64, tokens before each document (the
            last entry is the corpus size in tokens).
    """

    documents: int
    sequences: int
    dtype: type
    tokens_before_document: np.ndarray


def read_index(prefix: str) -> IndexedDatasetInfo:
    """Reads ``prefix.idx`` and checks ``prefix.bin`` against it.

    Raises:
        RunCheckError: a bad header, a truncated ``.idx``, or a ``.bin`` whose size is not what
            the ``.idx`` describes (truncated, or the ``.idx`` of another file).
    """
    idx_path, bin_path = Path(prefix + ".idx"), Path(prefix + ".bin")
    fix = f"Re-create both with tools/preprocess_data.py (--output-prefix {prefix})."
    size = idx_path.stat().st_size
    with open(idx_path, "rb") as stream:
        head = stream.read(34)
    if len(head) < 34 or head[:9] != _IDX_HEADER or struct.unpack("<Q", head[9:17])[0] != 1:
        raise RunCheckError(f"{idx_path} is not a Megatron index file (bad header). {fix}")
    code = head[17]
    if code not in _IDX_DTYPES:
        raise RunCheckError(f"{idx_path} names an unknown token dtype (code {code}). {fix}")
    dtype = _IDX_DTYPES[code]
    sequences, doc_entries = struct.unpack("<QQ", head[18:34])
    expected = 34 + 4 * sequences + 8 * sequences + 8 * doc_entries
    if size not in (expected, expected + sequences):  # + 1 byte per sequence when multimodal
        raise RunCheckError(
            f"{idx_path} has {size} bytes but its header describes {sequences} sequences and "
            f"{doc_entries - 1} documents ({expected} bytes): it is truncated or damaged. {fix}"
        )
    mm = np.memmap(idx_path, mode="r")
    lengths = np.frombuffer(mm, dtype=np.int32, count=sequences, offset=34)
    pointers = np.frombuffer(mm, dtype=np.int64, count=sequences, offset=34 + 4 * sequences)
    doc_index = np.frombuffer(mm, dtype=np.int64, count=doc_entries, offset=34 + 12 * sequences)
    itemsize = np.dtype(dtype).itemsize
    bin_expected = int(pointers[-1] + lengths[-1] * itemsize) if sequences else 0
    if doc_entries < 1 or doc_index[0] != 0 or doc_index[-1] != sequences:
        raise RunCheckError(f"{idx_path}: its document index does not cover its sequences. {fix}")
    bin_size = bin_path.stat().st_size
    if bin_size != bin_expected:
        what = (
            "it is truncated"
            if bin_size < bin_expected
            else "the .idx describes only part of it (the .idx of another file?)"
        )
        raise RunCheckError(
            f"{bin_path} has {bin_size} bytes but {idx_path} describes {bin_expected} "
            f"({sequences} sequences of {np.dtype(dtype).name}): {what}. {fix}"
        )
    starts = np.append(pointers, bin_expected) // itemsize
    tokens_before = starts[doc_index].astype(np.int64)
    return IndexedDatasetInfo(doc_entries - 1, sequences, dtype, tokens_before)


def max_token_id(prefix: str, info: IndexedDatasetInfo) -> tuple[int, bool]:
    """``(largest token id, whether every token was read)`` of ``prefix.bin``.

    Reads all of it up to :data:`FULL_SCAN_BYTES`, else :data:`SCAN_WINDOWS` evenly spaced
    windows.
    """
    data = np.memmap(prefix + ".bin", dtype=info.dtype, mode="r")
    if data.size == 0:
        return -1, True
    if data.nbytes <= FULL_SCAN_BYTES:
        return int(data.max()), True
    window = FULL_SCAN_BYTES // SCAN_WINDOWS // data.itemsize
    starts = np.linspace(0, data.size - window, SCAN_WINDOWS).astype(np.int64)
    return max(int(data[s : s + window].max()) for s in starts), False


def foreign_token_error(where: str, token: int, vocab_size: int, tokenizer: str):
    """The RunCheckError for a token id outside ``[0, vocab_size)`` found in ``where``."""
    return RunCheckError(
        f"{where} holds token id {token}, outside the {vocab_size} ids of the tokenizer "
        f"(--tokenizer-type {tokenizer}): the data was tokenized with another tokenizer. Pass "
        "the tokenizer (and --vocab-size) it was made with, or re-tokenize it with "
        "tools/preprocess_data.py."
    )


def check_token_ids(prefix: str, info: IndexedDatasetInfo, vocab_size: int, tokenizer: str):
    """Raises RunCheckError when ``prefix.bin`` holds a token id >= ``vocab_size``."""
    largest, complete = max_token_id(prefix, info)
    if largest >= vocab_size:
        where = f"{prefix}.bin" + ("" if complete else " (a sample of it)")
        raise foreign_token_error(where, largest, vocab_size, tokenizer)


def check_batch_token_ids(batch: dict, vocab_size: int, tokenizer: str) -> None:
    """Raises RunCheckError when a batch's ``tokens`` or ``labels`` leave ``[0, vocab_size)``.

    Such ids would fail deep in the embedding with a bare IndexError (or, below the padded
    size, train rows no token should reach). Meant for the batch while it is still on the CPU,
    where the check costs no device synchronisation.
    """
    for key in ("tokens", "labels"):
        value = batch.get(key)
        if value is None or value.numel() == 0:
            continue
        largest, smallest = int(value.max()), int(value.min())
        if largest >= vocab_size or smallest < 0:
            bad = largest if largest >= vocab_size else smallest
            raise foreign_token_error(f"a training batch ({key!r})", bad, vocab_size, tokenizer)


def check_split(prefix: str, info: IndexedDatasetInfo, split: str, split_matrix) -> None:
    """Raises RunCheckError when a split with a non-zero weight gets no documents or no tokens.

    Args:
        prefix: the dataset (for the message).
        info: its index.
        split: ``--split`` as given.
        split_matrix: ``[(begin, end)]`` fractions per split (train, valid, test), None for a
            split of weight 0, as Megatron's ``GPTDatasetConfig.split_matrix``.
    """
    names = ("train", "valid", "test")
    for name, bounds in zip(names, split_matrix, strict=False):
        if bounds is None:
            continue
        # The rounding of BlendedMegatronDatasetBuilder._build_megatron_dataset_splits.
        begin = int(round(bounds[0] * float(info.documents)))
        end = int(round(bounds[1] * float(info.documents)))
        tokens = int(info.tokens_before_document[end] - info.tokens_before_document[begin])
        if end > begin and tokens > 0:
            continue
        got = f"{end - begin} of {info.documents} documents" + (
            f" ({tokens} tokens)" if end > begin else ""
        )
        raise RunCheckError(
            f"--split {split} gives the {name} split {got} of {prefix}: Megatron would loop "
            f"forever building it. Give {name} a weight of 0 in --split (with --eval-iters 0 "
            "for valid), a larger share, or use more data."
        )


def check_data(args, vocab_size: int | None) -> None:
    """The data checks for Megatron's parsed arguments (no-op with ``--mock-data``).

    Every rank checks the indexes and the split (cheap); rank 0 also scans the tokens.
    """
    if args.mock_data:
        return
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, _ = get_blend_and_blend_per_split(args)
    blended = set(blend[0]) if blend else set()
    split_vector = parse_and_normalize_split(args.split)
    split_matrix = convert_split_vector_to_split_matrix(split_vector)
    for prefix in dict.fromkeys(data_prefixes(args)):
        if prefix.startswith(("s3://", "msc://")):
            continue
        info = read_index(prefix)
        if _global_rank() == 0 and vocab_size is not None:
            check_token_ids(prefix, info, vocab_size, args.tokenizer_type)
        if prefix in blended:
            check_split(prefix, info, args.split, split_matrix)


def data_prefixes(args) -> list[str]:
    """The dataset prefixes of ``--data-path`` and of the per-split ``--*-data-path`` flags."""
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    prefixes = list(blend[0]) if blend else []
    for split_blend in blend_per_split or []:
        prefixes += list(split_blend[0]) if split_blend else []
    return prefixes


def _global_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
