"""Tokenize a text corpus into Megatron's indexed dataset format (``.bin`` / ``.idx``).

This mirrors the command line of Megatron-LM's ``tools/preprocess_data.py`` where it makes sense,
but reads the corpus with Hugging Face ``datasets`` so JSON Lines, plain text and Parquet inputs
(optionally compressed, e.g. ``.jsonl.gz``) all work, and tokenization runs in parallel through
``Dataset.map(num_proc=...)``.

For every ``--json-keys`` entry ``KEY`` it writes ``<output-prefix>_<KEY>_document.bin`` and
``<output-prefix>_<KEY>_document.idx``; pass ``<output-prefix>_<KEY>_document`` to training as
``--data-path``. Each input record becomes one document with a single sequence. Records whose text
is empty are skipped (they would yield zero tokens; Megatron-LM's tool adds no sequence for them
either).

Input formats:
    * ``json``: JSON Lines (``.jsonl``, ``.ndjson``) or a JSON file (``.json``); the text is taken
      from the ``--json-keys`` fields.
    * ``text``: every file is ONE document (its whole contents, newlines included). Split a corpus
      into one file per document, or convert it to JSON Lines, to get several documents.
    * ``parquet``: the text is taken from the ``--json-keys`` columns.

Tokenizers:
    * ``ByteLevel``: built in, needs no download. Token ids are the UTF-8 bytes (0..255) and the
      end-of-document id is 256. Train with
      ``--tokenizer-type NullTokenizer --vocab-size 257`` (megatron-core's NullTokenizer uses
      ``vocab_size - 1`` = 256 as its end-of-document id).
    * ``HuggingFaceTokenizer``: ``--tokenizer-model`` is a local directory loaded with
      ``transformers.AutoTokenizer.from_pretrained(dir, local_files_only=True)``. Like
      Megatron-LM, the tokenizer's special tokens (e.g. BOS) are added unless
      ``--no-add-special-tokens`` is given. The end-of-document id is the tokenizer's
      ``eos_token_id`` unless ``--eod-id`` is given.
    * ``GPT2BPETokenizer``: GPT-2 style byte-level BPE from ``--vocab-file`` (``vocab.json``)
      and ``--merge-file`` (``merges.txt``), built with the ``tokenizers`` package the way
      ``transformers``' ``GPT2Tokenizer`` builds it, which megatron-core's GPT2BPETokenizer
      wraps. No special tokens are added to a document. The end-of-document id is that of
      ``<|endoftext|>`` (added after the vocabulary, as ``transformers`` does, if the vocabulary
      lacks it). Train with the same ``--tokenizer-type GPT2BPETokenizer --vocab-file ...
      --merge-file ...``; note that megatron-core 0.19.2 builds this tokenizer with
      ``AutoTokenizer.from_pretrained("gpt2", vocab_file=..., merges_file=...)``, so training
      also reads the Hugging Face Hub's ``gpt2`` tokenizer configuration (network or HF cache).
    * ``SentencePieceTokenizer``: ``--tokenizer-model`` is a SentencePiece ``.model`` file,
      loaded with the ``sentencepiece`` package. As megatron-core's SentencePieceTokenizer does
      (with its defaults: no legacy special tokens, extra whitespace left to the model), a
      document is encoded without BOS or EOS, and the end-of-document id is the model's
      ``eos_id()`` (``</s>``). Train with ``--tokenizer-type SentencePieceTokenizer
      --tokenizer-model ...``.

    For ``GPT2BPETokenizer`` and ``SentencePieceTokenizer`` the end-of-document id is the one
    Megatron's tokenizer has, so ``--eod-id`` may only repeat it. Flags that the chosen tokenizer
    does not use (e.g. ``--vocab-file`` with ``SentencePieceTokenizer``) are refused.

Many files and parallel workers:
    ``--input`` takes several paths and quoted globs. Documents keep the order of the inputs as
    given; the matches of a glob are sorted by name (zero-pad shard numbers: ``shard_10`` sorts
    before ``shard_2``). ``--workers N`` tokenizes in N processes (``Dataset.map(num_proc=N)``,
    which splits the corpus into N contiguous shards and joins the results in order), so the
    output does not depend on N.

Bad input files:
    Every file is checked when it is loaded: unreadable or corrupt (e.g. a truncated ``.gz``, a
    line that is not JSON, a broken Parquet file, text that is not UTF-8), empty (0 bytes, no
    records, or a ``--json-keys`` field empty or whitespace-only in every record), a field
    missing, null or not text. Each bad file is reported by name, with the line or record where
    it can be told. By default the run then stops before tokenizing, naming all bad files and
    writing nothing; with ``--skip-bad-files`` each bad file is left out with a warning and the
    run ends with a list of the skipped files. Mistakes in the arguments (a missing file, a glob
    that matches nothing, an unknown extension) always stop the run.

Progress and throughput:
    Progress bars on stderr for each stage: loading (bytes of input files read), tokenizing
    (``datasets``' bar) and writing (documents). ``--no-progress`` turns them all off; tqdm's
    environment variables also apply, e.g. ``TQDM_MININTERVAL=30`` for fewer updates in a
    batch job's log, or ``TQDM_DISABLE=1``. The run ends with the time of each stage and the
    throughput in documents/s and MB/s of text (UTF-8 bytes of the ``--json-keys`` fields).

Nothing is written under the final output names until every document has been tokenized and
written: the files are built under temporary names in the output directory and renamed at the
end, and removed on any error (or Ctrl-C), so a failed run never leaves a partial ``.bin``/``.idx``
behind.

Examples:
    python tools/preprocess_data.py --input 'data/*.jsonl' --output-prefix data/corpus \\
        --tokenizer-type ByteLevel --append-eod --workers 8 --skip-bad-files

    python tools/preprocess_data.py --input 'data/*.jsonl' --output-prefix data/corpus \\
        --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json \\
        --merge-file gpt2-merges.txt --append-eod --workers 8

    python tools/preprocess_data.py --input 'data/*.jsonl' --output-prefix data/corpus \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tokenizer.model --append-eod
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

FORMATS = ("json", "text", "parquet")
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip")
EXTENSION_FORMATS = {
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".txt": "text",
    ".text": "text",
    ".parquet": "parquet",
}
GLOB_CHARS = ("*", "?", "[")
BYTE_LEVEL_EOD_ID = 256
BYTE_LEVEL_VOCAB_SIZE = 257
TOKENIZER_TYPES = (
    "ByteLevel",
    "HuggingFaceTokenizer",
    "GPT2BPETokenizer",
    "SentencePieceTokenizer",
)
# The optional tokenizer flags: argument name -> (flag, the tokenizer types that use it).
TOKENIZER_FLAGS = {
    "tokenizer_model": ("--tokenizer-model", ("HuggingFaceTokenizer", "SentencePieceTokenizer")),
    "vocab_file": ("--vocab-file", ("GPT2BPETokenizer",)),
    "merge_file": ("--merge-file", ("GPT2BPETokenizer",)),
    "no_add_special_tokens": ("--no-add-special-tokens", ("HuggingFaceTokenizer",)),
}
GPT2_EOD_TOKEN = "<|endoftext|>"
LEVEL = "document"
EMPTY_IDS = np.empty(0, dtype=np.int32)


class PreprocessError(Exception):
    """A user-facing error: bad arguments or bad input. Printed without a traceback."""


class BadInputFile(PreprocessError):
    """An input file that cannot be used (corrupt, unreadable, empty or without usable text).

    Unlike the other errors this one is about the file's contents, so ``--skip-bad-files`` can
    leave the file out instead of stopping the run.

    Args:
        path: The input file.
        reason: What is wrong with it, phrased to follow the file name (e.g. ``"is empty"``).
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"input file {path!r} {reason}")
        self.path = path
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


class ByteLevelTokenizer:
    """Tokenizer whose token ids are the UTF-8 bytes of the text.

    Ids 0..255 are bytes and 256 is the end-of-document token, so the vocabulary has 257 entries.
    Training should use Megatron's ``--tokenizer-type NullTokenizer --vocab-size 257``.
    """

    name = "ByteLevel"
    vocab_size = BYTE_LEVEL_VOCAB_SIZE
    eod = BYTE_LEVEL_EOD_ID

    def tokenize_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Tokenize a batch of texts.

        Args:
            texts: The texts to tokenize.

        Returns:
            One uint8 array of byte values per text.
        """
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def training_flags(self) -> str:
        """Return Megatron's tokenizer flags for training on the output."""
        return (
            f"--tokenizer-type NullTokenizer --vocab-size {BYTE_LEVEL_VOCAB_SIZE} "
            f"(end-of-document id = vocab_size - 1 = {BYTE_LEVEL_EOD_ID})"
        )


class HuggingFaceTokenizer:
    """Wrapper around a local ``transformers`` tokenizer.

    Args:
        model_dir: Local directory holding the tokenizer files (as written by
            ``save_pretrained``).
        eod_id: End-of-document id overriding the tokenizer's ``eos_token_id``.
        add_special_tokens: Whether the tokenizer adds its special tokens (e.g. BOS), as
            Megatron-LM's HuggingFaceTokenizer does.

    Raises:
        PreprocessError: If ``transformers`` is missing or the directory cannot be loaded.
    """

    name = "HuggingFaceTokenizer"

    def __init__(self, model_dir: str, eod_id: int | None, add_special_tokens: bool) -> None:
        try:
            import transformers  # noqa: F401
        except ImportError as exc:
            raise PreprocessError(
                "--tokenizer-type HuggingFaceTokenizer needs the 'transformers' package: "
                "run `pip install transformers` (or use --tokenizer-type ByteLevel)"
            ) from exc
        from transformers import AutoTokenizer

        if not os.path.isdir(model_dir):
            hint = (
                "; for a SentencePiece .model file use --tokenizer-type SentencePieceTokenizer"
                if os.path.isfile(model_dir)
                else ""
            )
            raise PreprocessError(
                f"--tokenizer-model {model_dir!r} is not a directory; pass a local directory "
                f"containing the tokenizer files (e.g. written by tokenizer.save_pretrained){hint}"
            )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except Exception as exc:  # transformers raises many different types here
            raise PreprocessError(
                f"could not load a Hugging Face tokenizer from {model_dir!r}: {exc}"
            ) from exc
        self.model_dir = model_dir
        self.add_special_tokens = add_special_tokens
        # len() counts added tokens, which ``vocab_size`` leaves out.
        self.vocab_size = max(len(self.tokenizer), int(self.tokenizer.vocab_size or 0))
        self.eod = eod_id if eod_id is not None else self.tokenizer.eos_token_id

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        """Tokenize a batch of texts.

        Args:
            texts: The texts to tokenize.

        Returns:
            One list of token ids per text.
        """
        out = self.tokenizer(texts, add_special_tokens=self.add_special_tokens, verbose=False)
        return out["input_ids"]

    def training_flags(self) -> str:
        """Return Megatron's tokenizer flags for training on the output."""
        return f"--tokenizer-type HuggingFaceTokenizer --tokenizer-model {self.model_dir}"


def _check_tokenizer_file(flag: str, path: str, what: str, suffix: str = "") -> None:
    """Check that a tokenizer file given on the command line is an existing file.

    Args:
        flag: The command line flag, e.g. ``--vocab-file``.
        path: Its value.
        what: What the file should be, e.g. ``"GPT-2 vocab.json"``.
        suffix: The usual file name suffix; files with it are suggested when ``path`` is a
            directory.

    Raises:
        PreprocessError: If ``path`` does not exist or is a directory.
    """
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(glob.escape(path), f"*{suffix}"))) if suffix else []
        hint = f" (e.g. {found[0]!r})" if found else ""
        raise PreprocessError(f"{flag} {path!r} is a directory; pass the {what} file itself{hint}")
    if not os.path.isfile(path):
        raise PreprocessError(f"{flag} {path!r} does not exist; pass the path of the {what} file")


def _read_gpt2_vocab(path: str) -> dict[str, int]:
    """Read a GPT-2 style ``vocab.json``: a JSON object mapping each token to its id.

    Args:
        path: The ``--vocab-file`` value.

    Returns:
        Token to id.

    Raises:
        PreprocessError: If the file is missing or not such a JSON object.
    """
    _check_tokenizer_file("--vocab-file", path, "GPT-2 style vocab.json", ".json")
    expected = "expected a GPT-2 style vocab.json, a JSON object mapping each token to its id"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise PreprocessError(
            f"--vocab-file {path!r} is not UTF-8 text ({exc}); {expected}"
        ) from exc
    try:
        vocab = json.loads(text)
    except json.JSONDecodeError as exc:
        swapped = (
            "; it looks like a merges file: did you swap --vocab-file and --merge-file?"
            if text.startswith("#version")
            else ""
        )
        raise PreprocessError(
            f"--vocab-file {path!r} is not valid JSON ({exc}); {expected}{swapped}"
        ) from exc
    if not isinstance(vocab, dict) or not vocab:
        found = "an empty object" if isinstance(vocab, dict) else f"a JSON {type(vocab).__name__}"
        raise PreprocessError(f"--vocab-file {path!r} holds {found}; {expected}")
    for token, token_id in vocab.items():
        if type(token_id) is not int or token_id < 0:
            raise PreprocessError(
                f"--vocab-file {path!r} maps {token!r} to {token_id!r}, not to a token id "
                f"(an integer >= 0); {expected}"
            )
    return vocab


def _read_gpt2_merges(path: str, vocab: dict[str, int], vocab_path: str) -> list[tuple[str, str]]:
    """Read a GPT-2 style ``merges.txt`` and check it against the vocabulary.

    The format is the one the ``tokenizers`` package reads: an optional first line starting with
    ``#version``, then one merge per line, two tokens separated by one space.

    Args:
        path: The ``--merge-file`` value.
        vocab: The vocabulary read from ``vocab_path``.
        vocab_path: The ``--vocab-file`` value (for the error messages).

    Returns:
        The merges in order of priority.

    Raises:
        PreprocessError: If the file is missing, not in this format, holds no merge, or uses a
            token that the vocabulary lacks.
    """
    _check_tokenizer_file("--merge-file", path, "GPT-2 style merges.txt", ".txt")
    expected = (
        "expected a GPT-2 style merges.txt: one merge per line, two tokens separated by one "
        "space, after an optional '#version' line"
    )
    try:
        with open(path, encoding="utf-8", newline="") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as exc:
        raise PreprocessError(
            f"--merge-file {path!r} is not UTF-8 text ({exc}); {expected}"
        ) from exc
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    merges = []
    for lineno, line in enumerate(lines, start=1):
        line = line.removesuffix("\r")
        if line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            swapped = (
                "; it looks like JSON: did you swap --vocab-file and --merge-file?"
                if lineno == 1 and line.lstrip().startswith("{")
                else ""
            )
            raise PreprocessError(
                f"--merge-file {path!r} line {lineno} is {line[:80]!r}; {expected}{swapped}"
            )
        for token in (*parts, "".join(parts)):
            if token not in vocab:
                raise PreprocessError(
                    f"--merge-file {path!r} does not belong to --vocab-file {vocab_path!r}: "
                    f"line {lineno} ({line!r}) makes token {token!r}, which the vocabulary "
                    "lacks; pass the merges.txt written together with this vocab.json"
                )
        merges.append((parts[0], parts[1]))
    if not merges:
        raise PreprocessError(f"--merge-file {path!r} holds no merge; {expected}")
    return merges


class GPT2BPETokenizer:
    """GPT-2 style byte-level BPE from a ``vocab.json`` and a ``merges.txt``.

    Built with the ``tokenizers`` package exactly as ``transformers``' ``GPT2Tokenizer`` builds
    its backend (no prefix space, no dropout, ``<|endoftext|>`` a special token), which
    megatron-core's GPT2BPETokenizer wraps. No special tokens are added to a document.

    Args:
        vocab_file: The ``vocab.json`` (``--vocab-file``).
        merge_file: The ``merges.txt`` (``--merge-file``).

    Raises:
        PreprocessError: If ``tokenizers`` is missing or the files are not a GPT-2 style BPE.
    """

    name = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        try:
            import tokenizers
        except ImportError as exc:
            raise PreprocessError(
                "--tokenizer-type GPT2BPETokenizer needs the 'tokenizers' package: run "
                "`pip install tokenizers`"
            ) from exc
        from tokenizers import decoders, models, pre_tokenizers

        vocab = _read_gpt2_vocab(vocab_file)
        merges = _read_gpt2_merges(merge_file, vocab, vocab_file)
        try:
            model = models.BPE(
                vocab,
                merges,
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix="",
                fuse_unk=False,
            )
        except Exception as exc:  # tokenizers raises a bare Exception
            raise PreprocessError(
                f"could not build a BPE tokenizer from --vocab-file {vocab_file!r} and "
                f"--merge-file {merge_file!r}: {exc}"
            ) from exc
        self.tokenizer = tokenizers.Tokenizer(model)
        self.tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.tokenizer.decoder = decoders.ByteLevel()
        # Like transformers' GPT2Tokenizer (unk, bos and eos are all <|endoftext|>): matched in
        # the text as one token, and appended to the vocabulary if it lacks it.
        self.tokenizer.add_special_tokens([tokenizers.AddedToken(GPT2_EOD_TOKEN, special=True)])
        self.vocab_file = vocab_file
        self.merge_file = merge_file
        self.eod_added = GPT2_EOD_TOKEN not in vocab
        self.eod = self.tokenizer.token_to_id(GPT2_EOD_TOKEN)
        self.vocab_size = max(
            self.tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1
        )

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        """Tokenize a batch of texts.

        Args:
            texts: The texts to tokenize.

        Returns:
            One list of token ids per text.
        """
        # encode_batch_fast (tokenizers >= 0.20) skips the offsets, which are not needed here.
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def training_flags(self) -> str:
        """Return Megatron's tokenizer flags for training on the output."""
        added = ", added after the vocabulary" if self.eod_added else ""
        return (
            f"--tokenizer-type GPT2BPETokenizer --vocab-file {self.vocab_file} --merge-file "
            f"{self.merge_file} (end-of-document id {self.eod} = {GPT2_EOD_TOKEN}{added})"
        )


class SentencePieceTokenizer:
    """A SentencePiece model (``.model`` file), encoded as megatron-core's tokenizer does.

    megatron-core's SentencePieceTokenizer, with its default settings, encodes a text with
    ``encode_as_ids`` (no BOS, no EOS) and takes the model's ``eos_id()`` as end-of-document id.

    Args:
        model_file: The ``.model`` file (``--tokenizer-model``).

    Raises:
        PreprocessError: If ``sentencepiece`` is missing or the file is not a SentencePiece model.
    """

    name = "SentencePieceTokenizer"

    def __init__(self, model_file: str) -> None:
        try:
            import sentencepiece
        except ImportError as exc:
            raise PreprocessError(
                "--tokenizer-type SentencePieceTokenizer needs the 'sentencepiece' package: run "
                "`pip install sentencepiece`"
            ) from exc
        _check_tokenizer_file("--tokenizer-model", model_file, "SentencePiece .model", ".model")
        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_file=model_file)
        except (RuntimeError, OSError) as exc:
            raise PreprocessError(
                f"--tokenizer-model {model_file!r} is not a SentencePiece model ({exc}); pass "
                "the .model file written by SentencePieceTrainer (a Hugging Face tokenizer "
                "directory takes --tokenizer-type HuggingFaceTokenizer)"
            ) from exc
        self.model_file = model_file
        self.vocab_size = self.processor.get_piece_size()
        self.eod = self.processor.eos_id()  # -1 when the model has no end-of-sentence piece

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        """Tokenize a batch of texts.

        Args:
            texts: The texts to tokenize.

        Returns:
            One list of token ids per text.
        """
        return self.processor.encode(texts, out_type=int, add_bos=False, add_eos=False)

    def training_flags(self) -> str:
        """Return Megatron's tokenizer flags for training on the output."""
        eod = (
            f"end-of-document id {self.eod} = {self.processor.id_to_piece(self.eod)}"
            if self.eod >= 0
            else "the model has no end-of-document id: its eos_id is -1"
        )
        return (
            f"--tokenizer-type SentencePieceTokenizer --tokenizer-model {self.model_file} ({eod})"
        )


Tokenizer = ByteLevelTokenizer | HuggingFaceTokenizer | GPT2BPETokenizer | SentencePieceTokenizer


def _check_fixed_eod(args: argparse.Namespace, tokenizer: Tokenizer, what: str) -> None:
    """Check ``--eod-id`` against a tokenizer whose end-of-document id is fixed.

    Args:
        args: Parsed command line arguments.
        tokenizer: The tokenizer.
        what: The end-of-document token, for the messages.

    Raises:
        PreprocessError: If ``--eod-id`` is outside the vocabulary or another id.
    """
    if args.eod_id is None:
        return
    kind = args.tokenizer_type
    if not 0 <= args.eod_id < tokenizer.vocab_size:
        raise PreprocessError(
            f"--eod-id {args.eod_id} is outside the tokenizer's vocabulary "
            f"(0..{tokenizer.vocab_size - 1}); drop --eod-id: --tokenizer-type {kind} uses "
            f"{tokenizer.eod} ({what})"
        )
    if args.eod_id != tokenizer.eod:
        raise PreprocessError(
            f"--tokenizer-type {kind} always uses end-of-document id {tokenizer.eod} ({what}), "
            f"as Megatron's {kind} does in training; drop --eod-id"
        )


def build_tokenizer(args: argparse.Namespace) -> Tokenizer:
    """Build the tokenizer selected on the command line and check its end-of-document id.

    Args:
        args: Parsed command line arguments.

    Returns:
        The tokenizer.

    Raises:
        PreprocessError: On an inconsistent tokenizer configuration.
    """
    kind = args.tokenizer_type
    for dest, (flag, users) in TOKENIZER_FLAGS.items():
        if getattr(args, dest) not in (None, False) and kind not in users:
            raise PreprocessError(
                f"{flag} is not used by --tokenizer-type {kind}; drop it, or use "
                f"--tokenizer-type {' or '.join(users)}"
            )

    if kind == "ByteLevel":
        if args.eod_id is not None and args.eod_id != BYTE_LEVEL_EOD_ID:
            raise PreprocessError(
                f"--tokenizer-type ByteLevel always uses end-of-document id {BYTE_LEVEL_EOD_ID}; "
                "drop --eod-id"
            )
        return ByteLevelTokenizer()

    if kind == "GPT2BPETokenizer":
        files = {"--vocab-file": args.vocab_file, "--merge-file": args.merge_file}
        missing = [flag for flag, value in files.items() if value is None]
        if missing:
            raise PreprocessError(
                f"--tokenizer-type GPT2BPETokenizer needs {' and '.join(missing)}: the GPT-2 "
                "style vocab.json and merges.txt (e.g. --vocab-file gpt2-vocab.json "
                "--merge-file gpt2-merges.txt)"
            )
        tokenizer = GPT2BPETokenizer(args.vocab_file, args.merge_file)
        _check_fixed_eod(args, tokenizer, GPT2_EOD_TOKEN)
        return tokenizer

    if kind == "SentencePieceTokenizer":
        if args.tokenizer_model is None:
            raise PreprocessError(
                "--tokenizer-type SentencePieceTokenizer needs --tokenizer-model <.model file>"
            )
        tokenizer = SentencePieceTokenizer(args.tokenizer_model)
        if tokenizer.eod < 0 and (args.append_eod or args.eod_id is not None):
            raise PreprocessError(
                f"the SentencePiece model {args.tokenizer_model!r} has no end-of-sentence piece "
                "(eos_id -1), which Megatron's SentencePieceTokenizer uses as end-of-document "
                "id; drop --append-eod and --eod-id, or use a model trained with an eos piece"
            )
        _check_fixed_eod(args, tokenizer, "the model's eos piece")
        return tokenizer

    if args.tokenizer_model is None:
        raise PreprocessError(
            "--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model <local directory>"
        )
    tokenizer = HuggingFaceTokenizer(
        args.tokenizer_model, args.eod_id, add_special_tokens=not args.no_add_special_tokens
    )
    if args.append_eod:
        if tokenizer.eod is None:
            raise PreprocessError(
                f"the tokenizer in {args.tokenizer_model!r} has no eos_token, so --append-eod "
                "has no end-of-document id; pass --eod-id <id>"
            )
        if not 0 <= tokenizer.eod < tokenizer.vocab_size:
            raise PreprocessError(
                f"--eod-id {tokenizer.eod} is outside the tokenizer's vocabulary "
                f"(0..{tokenizer.vocab_size - 1})"
            )
    return tokenizer


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def format_from_path(path: str) -> str | None:
    """Guess the input format from a file name.

    Args:
        path: The file path, possibly with a compression suffix such as ``.gz``.

    Returns:
        ``json``, ``text``, ``parquet`` or None when the extension is not recognised.
    """
    name = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return EXTENSION_FORMATS.get(os.path.splitext(name)[1])


def expand_inputs(patterns: list[str]) -> list[str]:
    """Expand ``--input`` paths and globs into an ordered list of files.

    Paths keep the order given on the command line; the matches of a glob are sorted.

    Args:
        patterns: File paths and/or glob patterns.

    Returns:
        The input files.

    Raises:
        PreprocessError: If a path does not exist, is a directory, or a glob matches no file.
    """
    files: list[str] = []
    for pattern in patterns:
        if any(c in pattern for c in GLOB_CHARS) and not os.path.exists(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise PreprocessError(
                    f"input glob {pattern!r} matches no file; check the path and quote the glob "
                    "so the shell does not expand it"
                )
            files.extend(matches)
        elif os.path.isdir(pattern):
            raise PreprocessError(
                f"input {pattern!r} is a directory; pass files or a glob such as "
                f"'{os.path.join(pattern, '*.jsonl')}'"
            )
        elif not os.path.isfile(pattern):
            raise PreprocessError(f"input file not found: {pattern!r}; check --input")
        else:
            files.append(pattern)
    return files


def _locate_json_error(path: str) -> str:
    """Find the first line of a JSON Lines file that is not UTF-8 or not a JSON object.

    Only used to improve an error message, so it gives up quietly on what it cannot tell: a
    compression fsspec does not know, or a ``.json`` file whose first line does not parse (it
    may be one multi-line JSON document).

    Args:
        path: The JSON Lines file, possibly compressed.

    Returns:
        A description such as ``" (line 3: Expecting value: 'not json')"`` or an empty string.
    """
    import fsspec
    from fsspec.utils import infer_compression

    compression = infer_compression(path)
    if compression is None and path.lower().endswith(COMPRESSION_SUFFIXES):
        return ""  # e.g. .zst without the zstandard package: the raw bytes would look corrupt
    name = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    one_document = name.endswith(".json")
    lineno = 0
    try:
        # Binary lines decoded one by one: a text-mode reader decodes whole chunks, so its
        # UnicodeDecodeError would not tell the line.
        with fsspec.open(path, "rb", compression=compression) as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    return f" (line {lineno}, byte {exc.start + 1}: {exc.reason})"
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    if one_document and lineno == 1:
                        return ""
                    return f" (line {lineno}: {exc.msg}: {line.strip()[:80]!r})"
                if not isinstance(record, dict):
                    return f" (line {lineno}: not a JSON object: {line.strip()[:80]!r})"
    except EOFError:
        return f" (the data stops after line {lineno}: the file is truncated)"
    except Exception:  # only a hint: the caller reports the real error
        return ""
    return ""


def load_file(path: str, fmt: str, keys: list[str], cache_dir: str | None) -> tuple[Any, int]:
    """Load one input file with Hugging Face ``datasets`` and check its text columns.

    Args:
        path: The input file.
        fmt: ``json``, ``text`` or ``parquet``.
        keys: The columns holding the text.
        cache_dir: The ``datasets`` cache directory, or None for the default.

    Returns:
        A ``datasets.Dataset`` holding only the ``keys`` columns, and the number of UTF-8 bytes
        of text in them.

    Raises:
        BadInputFile: If the file cannot be read, is not UTF-8, holds no records, lacks a key, a
            key holds something other than strings, or a key is empty in every record.
    """
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    if os.path.getsize(path) == 0:
        raise BadInputFile(path, "is empty (0 bytes)")
    kwargs: dict[str, Any] = {"sample_by": "document"} if fmt == "text" else {}
    try:
        ds = datasets.load_dataset(
            fmt, data_files=[os.path.abspath(path)], split="train", cache_dir=cache_dir, **kwargs
        )
    except Exception as exc:  # datasets wraps the real cause in DatasetGenerationError
        if "corresponds to no data" in str(exc):  # e.g. a JSON Lines file of blank lines
            raise BadInputFile(path, "contains no documents") from exc
        cause = exc.__cause__ or exc
        detail = _locate_json_error(path) if fmt == "json" else ""
        expected = {
            "json": "one JSON object per line",
            "parquet": "a Parquet file",
            "text": "UTF-8 text",
        }[fmt]
        raise BadInputFile(
            path,
            f"could not be read as {fmt}{detail}: {type(cause).__name__}: {cause} (expected "
            f"{expected}; if that is wrong, set --input-format)",
        ) from exc
    if len(ds) == 0:
        raise BadInputFile(path, "contains no documents")
    missing = [k for k in keys if k not in ds.column_names]
    if missing:
        raise BadInputFile(
            path,
            f"has no field {missing[0]!r} (fields found: {', '.join(ds.column_names) or 'none'}); "
            "set --json-keys to the field holding the text",
        )
    text_bytes = 0
    for key in keys:
        feature = ds.features[key]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise BadInputFile(
                path,
                f"holds {feature} values in field {key!r}, not text; set --json-keys to a field "
                "holding strings",
            )
        column = ds.data.column(key)
        if column.null_count:
            first = pc.index(pc.is_null(column), True).as_py()
            raise BadInputFile(
                path,
                f"has no {key!r} field (or it is null) in record {first + 1} "
                f"({column.null_count} record(s) affected); fix the file or drop those records",
            )
        # pyarrow's JSON and Parquet readers accept invalid UTF-8 in strings; it would only fail
        # later, inside a tokenizer worker. A full validation checks every string's bytes.
        offset = 0
        for chunk in column.chunks:
            try:
                chunk.validate(full=True)
            except pa.ArrowInvalid as exc:
                where = _locate_json_error(path) if fmt == "json" else ""
                # Arrow counts the string index from the start of the chunk.
                where = where or f" (records {offset + 1}..{offset + len(chunk)}: {exc})"
                raise BadInputFile(
                    path,
                    f"is not valid UTF-8 text in field {key!r}{where}; re-encode it as UTF-8",
                ) from exc
            offset += len(chunk)
        if not pc.any(pc.not_equal(pc.utf8_trim_whitespace(column), "")).as_py():
            raise BadInputFile(
                path,
                f"has no text: field {key!r} is empty or whitespace in all {len(ds)} record(s)",
            )
        text_bytes += pc.sum(pc.binary_length(column)).as_py()
    return ds.select_columns(keys), text_bytes


def _progress_bar(progress: bool, **kwargs: Any) -> tqdm:
    """Make a tqdm progress bar, turned off when ``progress`` is False.

    ``disable`` is passed only to turn the bar off: an explicit argument would override tqdm's
    ``TQDM_*`` environment variables (``TQDM_DISABLE=1`` and the like).

    Args:
        progress: Whether to show the bar.
        **kwargs: Arguments for ``tqdm``.

    Returns:
        The bar.
    """
    if not progress:
        kwargs["disable"] = True
    return tqdm(**kwargs)


@contextlib.contextmanager
def _datasets_progress_bars(enabled: bool) -> Iterator[None]:
    """Turn ``datasets``' progress bars off for a block when ``enabled`` is False.

    Never turns them on: the user may have turned them off (``HF_DATASETS_DISABLE_PROGRESS_BARS``).
    The previous setting comes back at the end, as the tests call the tool in-process.

    Args:
        enabled: Whether the bars may show.

    Yields:
        Nothing.
    """
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    if not enabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


@dataclass
class Corpus:
    """The loaded input files.

    Attributes:
        dataset: A ``datasets.Dataset`` with the ``--json-keys`` columns, one row per document.
        files: The input files loaded, in order.
        skipped: The bad input files left out (``--skip-bad-files``), in order.
        text_bytes: UTF-8 bytes of text in the ``--json-keys`` columns.
    """

    dataset: Any
    files: list[str]
    skipped: list[BadInputFile]
    text_bytes: int


def load_inputs(
    files: list[str],
    input_format: str | None,
    keys: list[str],
    cache_dir: str | None,
    skip_bad_files: bool = False,
    progress: bool = True,
) -> Corpus:
    """Load, check and concatenate all input files, in order.

    Every file is loaded even after a bad one, so a refused run names all bad files at once.

    Args:
        files: The input files.
        input_format: The ``--input-format`` value, or None to use each file's extension.
        keys: The columns holding the text.
        cache_dir: The ``datasets`` cache directory, or None for the default.
        skip_bad_files: Leave bad files out with a warning instead of refusing to go on.
        progress: Show a progress bar.

    Returns:
        The loaded corpus.

    Raises:
        PreprocessError: On an argument mistake (format not known, plain text with other keys),
            on any bad file unless ``skip_bad_files``, or when no file is usable.
    """
    import datasets

    # Argument mistakes first, before spending time on loading.
    formats = []
    for path in files:
        fmt = input_format or format_from_path(path)
        if fmt is None:
            raise PreprocessError(
                f"cannot tell the format of input file {path!r} from its extension; pass "
                f"--input-format {{{','.join(FORMATS)}}}"
            )
        if fmt == "text" and keys != ["text"]:
            raise PreprocessError(
                f"input file {path!r} is plain text, whose only field is 'text'; use "
                "--json-keys text (the default)"
            )
        formats.append(fmt)

    # Only local files are read, yet load_dataset sends a download-count request to the Hugging
    # Face Hub for every file: up to its 3 s timeout each where the network is slow or blocked
    # (0.13 s each measured here, 35 s for 200 small files).
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    parts, loaded, bad, text_bytes = [], [], [], 0
    sizes = [os.path.getsize(path) for path in files]
    # One bar over the bytes of all files. datasets' own bar ("Generating train split") shows
    # the progress inside a file, which is worth it only when there is one file: with many it
    # would print a bar per file.
    with (
        _progress_bar(progress, total=sum(sizes), desc="Loading", unit="B", unit_scale=True) as bar,
        _datasets_progress_bars(progress and len(files) == 1),
    ):
        for path, fmt, size in zip(files, formats, sizes, strict=True):
            try:
                ds, nbytes = load_file(path, fmt, keys, cache_dir)
            except BadInputFile as exc:
                bad.append(exc)
                level, action = ("warning", "; skipping it") if skip_bad_files else ("error", "")
                bar.write(f"{level}: {exc}{action}", file=sys.stderr)
            else:
                parts.append(ds)
                loaded.append(path)
                text_bytes += nbytes
            bar.update(size)

    if bad and not skip_bad_files:
        names = ", ".join(repr(b.path) for b in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise PreprocessError(
            f"{len(bad)} of {len(files)} input file(s) cannot be used ({names}{more}; the "
            "reasons are above), so nothing was written. Fix or remove them, or pass "
            "--skip-bad-files to leave them out"
        )
    if not parts:
        raise PreprocessError(
            f"all {len(files)} input file(s) are bad (the reasons are above); nothing to write"
        )
    if len(parts) == 1:
        dataset = parts[0]
    else:
        if any(p.features != parts[0].features for p in parts[1:]):
            target = datasets.Features({k: datasets.Value("large_string") for k in keys})
            parts = [p.cast(target) for p in parts]
        dataset = datasets.concatenate_datasets(parts)
    return Corpus(dataset, loaded, bad, text_bytes)


# --------------------------------------------------------------------------------------------
# Tokenization and writing
# --------------------------------------------------------------------------------------------


@dataclass
class _Encoder:
    """Picklable ``Dataset.map`` function that tokenizes the text columns of a batch."""

    tokenizer: Any
    keys: list[str]
    append_eod: bool

    def _finish(self, seq: Any) -> np.ndarray:
        """Convert one token sequence to int32 and append the end-of-document id if requested.

        Args:
            seq: Token ids (list or array).

        Returns:
            The int32 token ids.
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
            ``<key>_ids`` to list of token-id sequences. Empty texts give empty sequences (no
            special or end-of-document tokens), which the writer skips.
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


@dataclass
class KeyStats:
    """Counts for one output dataset."""

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

        with _progress_bar(
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


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv: Arguments without the program name; None means ``sys.argv[1:]``.

    Returns:
        The parsed arguments.
    """
    parser = argparse.ArgumentParser(
        description=(
            "Tokenize JSON Lines / text / Parquet files into Megatron's indexed dataset format "
            "(<output-prefix>_<key>_document.bin/.idx)."
        )
    )
    group = parser.add_argument_group("input data")
    group.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="Input files and/or quoted globs, processed in the order given (glob matches "
        "sorted). Formats: .jsonl/.ndjson/.json, .txt, .parquet, optionally compressed (.gz, ...).",
    )
    group.add_argument(
        "--input-format",
        choices=FORMATS,
        default=None,
        help="Format of all inputs, overriding the file extensions. 'text': each file is ONE "
        "document (its whole contents).",
    )
    group.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="Fields (JSON keys / Parquet columns) holding the text; one output dataset per key. "
        "Default: text.",
    )
    group = parser.add_argument_group("tokenizer")
    group.add_argument(
        "--tokenizer-type",
        choices=TOKENIZER_TYPES,
        required=True,
        help="ByteLevel: built-in, ids = UTF-8 bytes, end-of-document id 256 (train with "
        "--tokenizer-type NullTokenizer --vocab-size 257). HuggingFaceTokenizer: a local "
        "tokenizer directory given by --tokenizer-model. GPT2BPETokenizer: GPT-2 style BPE "
        "files given by --vocab-file and --merge-file, end-of-document id that of <|endoftext|>. "
        "SentencePieceTokenizer: a SentencePiece .model file given by --tokenizer-model, no "
        "BOS/EOS added, end-of-document id the model's eos_id. Train with the same "
        "--tokenizer-type (the summary at the end gives the flags).",
    )
    group.add_argument(
        "--tokenizer-model",
        default=None,
        help="HuggingFaceTokenizer: local directory of a Hugging Face tokenizer. "
        "SentencePieceTokenizer: the SentencePiece .model file.",
    )
    group.add_argument(
        "--vocab-file",
        default=None,
        help="GPT2BPETokenizer: the vocab.json (a JSON object mapping each token to its id), "
        "e.g. gpt2-vocab.json.",
    )
    group.add_argument(
        "--merge-file",
        default=None,
        help="GPT2BPETokenizer: the merges.txt that belongs to --vocab-file, e.g. gpt2-merges.txt.",
    )
    group.add_argument(
        "--eod-id",
        type=int,
        default=None,
        help="End-of-document id for HuggingFaceTokenizer (default: the tokenizer's "
        "eos_token_id). The other tokenizer types have a fixed one, which --eod-id may only "
        "repeat.",
    )
    group.add_argument(
        "--no-add-special-tokens",
        action="store_true",
        help="HuggingFaceTokenizer: do not let the tokenizer add its special tokens (e.g. BOS) "
        "to each document. By default they are added, as Megatron-LM's HuggingFaceTokenizer "
        "does. Refused with the other types (GPT2BPETokenizer and SentencePieceTokenizer add "
        "none, as Megatron's do).",
    )
    group.add_argument(
        "--append-eod",
        action="store_true",
        help="Append the end-of-document token to each document.",
    )
    group = parser.add_argument_group("output data")
    group.add_argument(
        "--output-prefix",
        required=True,
        help="Path prefix of the outputs: <prefix>_<key>_document.bin/.idx are written.",
    )
    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--workers",
        type=int,
        default=1,
        help="Number of tokenizer processes (Dataset.map num_proc). The output does not "
        "depend on it. Default: 1.",
    )
    group.add_argument(
        "--skip-bad-files",
        action="store_true",
        help="Leave out input files that are corrupt, unreadable or empty (or whose text field "
        "is missing, not text or empty), with a warning for each and a list at the end. By "
        "default any such file stops the run before anything is written.",
    )
    group.add_argument(
        "--no-progress",
        action="store_true",
        help="Show no progress bars (by default each stage, loading / tokenizing / writing, "
        "shows one on stderr, also when it is not a terminal; tqdm's TQDM_* environment "
        "variables apply, e.g. TQDM_MININTERVAL=30).",
    )
    group.add_argument(
        "--cache-dir",
        default=None,
        help="Hugging Face datasets cache directory (default: $HF_DATASETS_CACHE or "
        "~/.cache/huggingface/datasets). The corpus and its tokens are cached there.",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if len(set(args.json_keys)) != len(args.json_keys):
        parser.error("--json-keys lists a key twice")
    return args


def _quiet_megatron_import() -> None:
    """Import megatron-core's indexed dataset module without its GPU-related import warnings."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core.datasets.indexed_dataset  # noqa: F401


def run(args: argparse.Namespace) -> dict:
    """Run the preprocessing.

    Args:
        args: Parsed command line arguments (see :func:`get_args`).

    Returns:
        Key to :class:`KeyStats`.

    Raises:
        PreprocessError: On bad arguments or inputs.
    """
    import datasets

    progress = not args.no_progress
    files = expand_inputs(args.input)
    tokenizer = build_tokenizer(args)
    # Before the clock starts (it takes seconds, whatever the corpus), and before forking the
    # workers so they do not import it again.
    _quiet_megatron_import()
    start = time.perf_counter()
    corpus = load_inputs(
        files, args.input_format, args.json_keys, args.cache_dir, args.skip_bad_files, progress
    )
    dataset = corpus.dataset
    skipped = f" ({len(corpus.skipped)} bad file(s) skipped)" if corpus.skipped else ""
    print(f"Loaded {len(dataset)} documents from {len(corpus.files)} file(s){skipped}.", flush=True)
    loaded = time.perf_counter()

    if args.workers > 1 and isinstance(tokenizer, (HuggingFaceTokenizer, GPT2BPETokenizer)):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with _datasets_progress_bars(progress):
        tokenized = dataset.map(
            _Encoder(tokenizer, list(args.json_keys), args.append_eod),
            batched=True,
            batch_size=1000,
            num_proc=args.workers if args.workers > 1 else None,
            remove_columns=dataset.column_names,
            features=datasets.Features(
                {f"{k}_ids": datasets.Sequence(datasets.Value("int32")) for k in args.json_keys}
            ),
            desc="Tokenizing",
        )
    tokenized_at = time.perf_counter()
    stats = write_outputs(
        tokenized, args.json_keys, args.output_prefix, tokenizer.vocab_size, progress
    )
    end = time.perf_counter()

    elapsed = end - start
    print(
        f"Done in {elapsed:.1f}s (loading {loaded - start:.1f}s, tokenizing "
        f"{tokenized_at - loaded:.1f}s, writing {end - tokenized_at:.1f}s, workers "
        f"{args.workers}) with tokenizer {tokenizer.name} (vocab size {tokenizer.vocab_size})."
    )
    megabytes = corpus.text_bytes / 1e6
    print(
        f"Throughput: {len(dataset) / elapsed:,.0f} docs/s, {megabytes / elapsed:.2f} MB/s "
        f"({len(dataset)} documents, {megabytes:.2f} MB of text)"
    )
    for key, st in stats.items():
        empty = f", skipped {st.skipped_empty} empty" if st.skipped_empty else ""
        print(f"  [{key}] {st.documents} documents{empty}, {st.tokens} tokens")
        for path in st.paths:
            print(f"    {path}")
    prefixes = " ".join(output_prefix_for(args.output_prefix, k) for k in args.json_keys)
    print(f"Train with: --data-path {prefixes}")
    print(f"  {tokenizer.training_flags()}")
    if corpus.skipped:
        # Again at the end, where it is seen: the warnings may have scrolled away.
        lines = "".join(f"\n  {b.path}: {b.reason}" for b in corpus.skipped)
        print(
            f"warning: skipped {len(corpus.skipped)} of {len(files)} input file(s) "
            f"(--skip-bad-files):{lines}",
            file=sys.stderr,
        )
    return stats


def main(argv: list[str] | None = None) -> int:
    """Command line entry point.

    Args:
        argv: Arguments without the program name; None means ``sys.argv[1:]``.

    Returns:
        The exit code: 0 on success, 1 on bad input, 130 on Ctrl-C (argparse exits with 2 on
        usage errors).
    """
    args = get_args(argv)
    try:
        run(args)
    except PreprocessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
