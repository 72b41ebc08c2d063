"""Tokenization of a loaded corpus, in parallel worker processes through ``Dataset.map``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from mhc_megatron.data.progress import datasets_progress_bars
from mhc_megatron.data.tokenizers import GPT2BPETokenizer, HuggingFaceTokenizer, Tokenizer

EMPTY_IDS = np.empty(0, dtype=np.int32)


@dataclass
class DocumentEncoder:
    """Picklable ``Dataset.map`` function that tokenizes the text columns of a batch.

    Attributes:
        tokenizer: The tokenizer (see :mod:`mhc_megatron.data.tokenizers`).
        keys: The text columns to tokenize.
        append_eod: Whether to append the tokenizer's end-of-document id to each document.
    """

    tokenizer: Any
    keys: list[str]
    append_eod: bool

    def _finish(self, seq: Any) -> np.ndarray:
        """Convert one token sequence to int32 and append the end-of-document id if requested.

        Args:
            seq: Token ids (list or 1-D array).

        Returns:
            The int32 token ids, shape ``(len(seq) + append_eod,)``.
        """
        ids = np.asarray(seq, dtype=np.int32)
        if self.append_eod:
            ids = np.append(ids, np.int32(self.tokenizer.eod))
        return ids

    def __call__(self, batch: dict[str, list[str]]) -> dict[str, list]:
        """Tokenize one batch.

        Args:
            batch: Column name to list of texts.

        Returns:
            ``<key>_ids`` to list of 1-D int32 token-id arrays, one per text. Empty texts give
            empty arrays (no special or end-of-document tokens), which the writer skips.
        """
        out = {}
        for key in self.keys:
            texts = batch[key]
            ids = self.tokenizer.tokenize_batch(texts)
            out[f"{key}_ids"] = [
                self._finish(seq) if text else EMPTY_IDS
                for seq, text in zip(ids, texts, strict=True)
            ]
        return out


def tokenize_dataset(
    dataset: Any,
    tokenizer: Tokenizer,
    keys: list[str],
    append_eod: bool,
    workers: int,
    progress: bool = True,
) -> Any:
    """Tokenize every document of a corpus.

    ``Dataset.map(num_proc=workers)`` splits the corpus into contiguous shards and joins the
    results in order, so the output does not depend on ``workers``.

    Args:
        dataset: A ``datasets.Dataset`` with one string column per key, one row per document.
        tokenizer: The tokenizer.
        keys: The text columns.
        append_eod: Whether to append the end-of-document id to each non-empty document.
        workers: Number of tokenizer processes; 1 tokenizes in this process.
        progress: Show ``datasets``' progress bar.

    Returns:
        A ``datasets.Dataset`` with one ``<key>_ids`` column (sequences of int32) per key, in the
        order of ``dataset``'s rows.
    """
    import datasets

    # The Rust tokenizers library warns about (and can deadlock on) its thread pool being forked
    # into the workers.
    if workers > 1 and isinstance(tokenizer, (HuggingFaceTokenizer, GPT2BPETokenizer)):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with datasets_progress_bars(progress):
        return dataset.map(
            DocumentEncoder(tokenizer, list(keys), append_eod),
            batched=True,
            batch_size=1000,
            num_proc=workers if workers > 1 else None,
            remove_columns=dataset.column_names,
            features=datasets.Features(
                {f"{k}_ids": datasets.Sequence(datasets.Value("int32")) for k in keys}
            ),
            desc="Tokenizing",
        )
