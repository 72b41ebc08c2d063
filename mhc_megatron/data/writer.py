"""Output: token ids written in Megatron's indexed dataset format (``.bin``/``.idx``), atomically.

For every text field ``KEY`` the files are ``<output-prefix>_<KEY>_document.bin`` and ``.idx``,
written with megatron-core's ``IndexedDatasetBuilder``, one document of one sequence per non-empty
text.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from mhc_megatron.data.errors import PreprocessError
from mhc_megatron.data.progress import progress_bar

LEVEL = "document"


def quiet_megatron_import() -> None:
    """Import megatron-core's indexed dataset module quietly and quickly.

    Without its GPU-related import warnings, and without compiling its fusions
    (``mhc_megatron/megatron_import.py``).
    """
    from mhc_megatron.megatron_import import import_megatron_uncompiled

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import_megatron_uncompiled()
        import megatron.core.datasets.indexed_dataset  # noqa: F401


@dataclass
class KeyStats:
    """Counts for one output dataset.

    Attributes:
        documents: Documents written (non-empty texts).
        tokens: Tokens written, end-of-document tokens included.
        skipped_empty: Empty texts left out.
        paths: The ``.bin`` and ``.idx`` paths.
    """

    documents: int = 0
    tokens: int = 0
    skipped_empty: int = 0
    paths: list[str] = field(default_factory=list)


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Return the path prefix of one output dataset, named like Megatron-LM's tool does.

    Args:
        output_prefix: The ``--output-prefix`` value.
        key: The text field.

    Returns:
        ``<output_prefix>_<key>_document``.
    """
    return f"{output_prefix}_{key}_{LEVEL}"


def _add_documents(column: Any, builder: Any, st: KeyStats, vocab_size: int) -> None:
    """Add one batch of token sequences to a builder, one document per non-empty sequence.

    Args:
        column: A pyarrow list column of token ids, one entry per document.
        builder: The key's ``IndexedDatasetBuilder``.
        st: The key's counts, updated.
        vocab_size: The tokenizer's vocabulary size.

    Raises:
        PreprocessError: If a token id does not fit the vocabulary.
    """
    import pyarrow.compute as pc

    column = column.combine_chunks()
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    values = column.flatten().to_numpy(zero_copy_only=False)
    if values.size:
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= vocab_size:
            raise PreprocessError(
                f"token id {hi if hi >= vocab_size else lo} is outside the vocabulary "
                f"(0..{vocab_size - 1}); check --eod-id and the tokenizer"
            )
    values = values.astype(builder.dtype, copy=False)
    start = 0
    for length in lengths.tolist():
        if length == 0:
            st.skipped_empty += 1
            continue
        builder.add_document(values[start : start + length], [length])
        start += length
        st.documents += 1
        st.tokens += length


def write_outputs(
    tokenized: Any, keys: list[str], output_prefix: str, vocab_size: int, progress: bool = True
) -> dict:
    """Write the tokenized documents in Megatron's indexed format, atomically.

    The ``.bin``/``.idx`` files are written under temporary names and renamed only after all keys
    are complete; on any error (KeyboardInterrupt included) the temporary files are removed.

    Args:
        tokenized: A ``datasets.Dataset`` with a ``<key>_ids`` column per key.
        keys: The text fields.
        output_prefix: The ``--output-prefix`` value.
        vocab_size: The tokenizer's vocabulary size (chooses the token dtype).
        progress: Show a progress bar (documents written).

    Returns:
        Key to :class:`KeyStats`.

    Raises:
        PreprocessError: If a token id does not fit the vocabulary or no document has text.
    """
    from megatron.core.datasets.indexed_dataset import (
        DType,
        IndexedDatasetBuilder,
        get_bin_path,
        get_idx_path,
    )

    dtype = DType.optimal_dtype(vocab_size)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    suffix = f".tmp-{os.getpid()}"
    stats = {key: KeyStats() for key in keys}
    temp_paths: list[str] = []
    renames: list[tuple[str, str]] = []
    builders = {}
    committed = False
    try:
        for key in keys:
            prefix = output_prefix_for(output_prefix, key)
            bin_path, idx_path = get_bin_path(prefix), get_idx_path(prefix)
            temp_paths += [bin_path + suffix, idx_path + suffix]
            builders[key] = IndexedDatasetBuilder(bin_path + suffix, dtype=dtype)
            # .idx last: a reader only sees the dataset once both files are in place.
            renames += [(bin_path + suffix, bin_path), (idx_path + suffix, idx_path)]
            stats[key].paths = [bin_path, idx_path]

        with progress_bar(
            progress, total=len(tokenized), desc="Writing", unit="doc", unit_scale=True
        ) as bar:
            for batch in tokenized.with_format("arrow").iter(batch_size=1000):
                for key in keys:
                    _add_documents(
                        batch.column(f"{key}_ids"), builders[key], stats[key], vocab_size
                    )
                bar.update(batch.num_rows)

        for key in keys:
            if stats[key].documents == 0:
                raise PreprocessError(
                    f"no document has any text in field {key!r} (all {stats[key].skipped_empty} "
                    "are empty); check --input and --json-keys"
                )
        for key in keys:
            prefix = output_prefix_for(output_prefix, key)
            builders[key].finalize(get_idx_path(prefix) + suffix)
        for src, dst in renames:
            os.replace(src, dst)
        committed = True
    finally:
        if not committed:
            for builder in builders.values():
                builder.data_file.close()
            for path in temp_paths:
                if os.path.exists(path):
                    os.remove(path)
    return stats
