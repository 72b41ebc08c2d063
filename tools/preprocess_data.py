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

Nothing is written under the final output names until every document has been tokenized and
written: the files are built under temporary names and renamed at the end, so a failed run never
leaves a partial ``.bin``/``.idx`` behind.

Example:
    python tools/preprocess_data.py --input 'data/*.jsonl' --output-prefix data/corpus \\
        --tokenizer-type ByteLevel --append-eod --workers 8
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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
LEVEL = "document"
EMPTY_IDS = np.empty(0, dtype=np.int32)


class PreprocessError(Exception):
    """A user-facing error: bad arguments or bad input. Printed without a traceback."""


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
            raise PreprocessError(
                f"--tokenizer-model {model_dir!r} is not a directory; pass a local directory "
                "containing the tokenizer files (e.g. written by tokenizer.save_pretrained)"
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


def build_tokenizer(args: argparse.Namespace) -> ByteLevelTokenizer | HuggingFaceTokenizer:
    """Build the tokenizer selected on the command line and check its end-of-document id.

    Args:
        args: Parsed command line arguments.

    Returns:
        The tokenizer.

    Raises:
        PreprocessError: On an inconsistent tokenizer configuration.
    """
    if args.tokenizer_type == "ByteLevel":
        if args.tokenizer_model is not None:
            raise PreprocessError(
                "--tokenizer-model is not used by --tokenizer-type ByteLevel; drop it, or use "
                "--tokenizer-type HuggingFaceTokenizer"
            )
        if args.eod_id is not None and args.eod_id != BYTE_LEVEL_EOD_ID:
            raise PreprocessError(
                f"--tokenizer-type ByteLevel always uses end-of-document id {BYTE_LEVEL_EOD_ID}; "
                "drop --eod-id"
            )
        return ByteLevelTokenizer()

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
    """Find the first line of a JSON Lines file that is not valid JSON.

    Only used to improve an error message, so it gives up quietly on compressed files or a file
    that is one JSON document.

    Args:
        path: The JSON Lines file.

    Returns:
        A description such as ``" (line 3: Expecting value ...)"`` or an empty string.
    """
    if format_from_path(path) != "json" or path.lower().endswith(COMPRESSION_SUFFIXES):
        return ""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            json.loads(text)
            return ""  # one valid JSON document: the problem is not a syntax error
        except json.JSONDecodeError:
            pass
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as exc:
                    return f" (line {lineno}: {exc.msg}: {line[:80]!r})"
    except (OSError, UnicodeDecodeError) as exc:
        return f" ({exc})"
    return ""


def load_file(path: str, fmt: str, keys: list[str], cache_dir: str | None) -> Any:
    """Load one input file with Hugging Face ``datasets`` and check its text columns.

    Args:
        path: The input file.
        fmt: ``json``, ``text`` or ``parquet``.
        keys: The columns holding the text.
        cache_dir: The ``datasets`` cache directory, or None for the default.

    Returns:
        A ``datasets.Dataset`` holding only the ``keys`` columns.

    Raises:
        PreprocessError: If the file cannot be read, holds no records, lacks a key, or a key holds
            something other than strings.
    """
    import datasets
    import pyarrow.compute as pc

    if os.path.getsize(path) == 0:
        raise PreprocessError(f"input file {path!r} is empty; remove it from --input")
    kwargs: dict[str, Any] = {"sample_by": "document"} if fmt == "text" else {}
    try:
        ds = datasets.load_dataset(
            fmt, data_files=[os.path.abspath(path)], split="train", cache_dir=cache_dir, **kwargs
        )
    except Exception as exc:  # datasets wraps the real cause in DatasetGenerationError
        if "corresponds to no data" in str(exc):  # e.g. a JSON Lines file of blank lines
            raise PreprocessError(
                f"input file {path!r} contains no documents; remove it from --input"
            ) from exc
        cause = exc.__cause__ or exc
        detail = _locate_json_error(path) if fmt == "json" else ""
        hint = {
            "json": "each line must be one JSON object (JSON Lines)",
            "parquet": "it must be a valid Parquet file",
            "text": "it must be UTF-8 text",
        }[fmt]
        raise PreprocessError(
            f"could not read input file {path!r} as {fmt}{detail}: "
            f"{type(cause).__name__}: {cause}; {hint} (or set --input-format)"
        ) from exc
    if len(ds) == 0:
        raise PreprocessError(f"input file {path!r} contains no documents; remove it from --input")
    missing = [k for k in keys if k not in ds.column_names]
    if missing:
        raise PreprocessError(
            f"input file {path!r} has no field {missing[0]!r} (fields found: "
            f"{', '.join(ds.column_names) or 'none'}); "
            "set --json-keys to the field holding the text"
        )
    for key in keys:
        feature = ds.features[key]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise PreprocessError(
                f"field {key!r} in input file {path!r} holds {feature} values, not text; set "
                "--json-keys to a field holding strings"
            )
        column = ds.data.column(key)
        if column.null_count:
            first = pc.index(pc.is_null(column), True).as_py()
            raise PreprocessError(
                f"record {first + 1} of input file {path!r} has no {key!r} field (or it is null); "
                f"{column.null_count} record(s) are affected. Fix the file or drop those records"
            )
    return ds.select_columns(keys)


def load_inputs(files: list[str], input_format: str | None, keys: list[str], cache_dir: str | None):
    """Load and concatenate all input files, in order.

    Args:
        files: The input files.
        input_format: The ``--input-format`` value, or None to use each file's extension.
        keys: The columns holding the text.
        cache_dir: The ``datasets`` cache directory, or None for the default.

    Returns:
        A ``datasets.Dataset`` with one row per document and the ``keys`` columns.

    Raises:
        PreprocessError: On any unreadable or invalid input.
    """
    import datasets

    parts = []
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
        parts.append(load_file(path, fmt, keys, cache_dir))
    if len(parts) == 1:
        return parts[0]
    if any(p.features != parts[0].features for p in parts[1:]):
        target = datasets.Features({k: datasets.Value("large_string") for k in keys})
        parts = [p.cast(target) for p in parts]
    return datasets.concatenate_datasets(parts)


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


def write_outputs(tokenized: Any, keys: list[str], output_prefix: str, vocab_size: int) -> dict:
    """Write the tokenized documents in Megatron's indexed format, atomically.

    The ``.bin``/``.idx`` files are written under temporary names and renamed only after all keys
    are complete; on any error the temporary files are removed.

    Args:
        tokenized: A ``datasets.Dataset`` with a ``<key>_ids`` column per key.
        keys: The text fields.
        output_prefix: The ``--output-prefix`` value.
        vocab_size: The tokenizer's vocabulary size (chooses the token dtype).

    Returns:
        Key to :class:`KeyStats`.

    Raises:
        PreprocessError: If a token id does not fit the vocabulary or no document has text.
    """
    import pyarrow.compute as pc
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

        for batch in tokenized.with_format("arrow").iter(batch_size=1000):
            for key in keys:
                column = batch.column(f"{key}_ids").combine_chunks()
                lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
                values = column.flatten().to_numpy(zero_copy_only=False)
                if values.size:
                    lo, hi = int(values.min()), int(values.max())
                    if lo < 0 or hi >= vocab_size:
                        raise PreprocessError(
                            f"token id {hi if hi >= vocab_size else lo} is outside the "
                            f"vocabulary (0..{vocab_size - 1}); check --eod-id and the tokenizer"
                        )
                values = values.astype(dtype, copy=False)
                builder, st = builders[key], stats[key]
                start = 0
                for length in lengths.tolist():
                    if length == 0:
                        st.skipped_empty += 1
                        continue
                    builder.add_document(values[start : start + length], [length])
                    start += length
                    st.documents += 1
                    st.tokens += length

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
        choices=("ByteLevel", "HuggingFaceTokenizer"),
        required=True,
        help="ByteLevel: built-in, ids = UTF-8 bytes, end-of-document id 256 (train with "
        "--tokenizer-type NullTokenizer --vocab-size 257). HuggingFaceTokenizer: a local "
        "tokenizer directory given by --tokenizer-model.",
    )
    group.add_argument(
        "--tokenizer-model",
        default=None,
        help="Local directory of a Hugging Face tokenizer (HuggingFaceTokenizer only).",
    )
    group.add_argument(
        "--eod-id",
        type=int,
        default=None,
        help="End-of-document id for HuggingFaceTokenizer (default: the tokenizer's eos_token_id).",
    )
    group.add_argument(
        "--no-add-special-tokens",
        action="store_true",
        help="Do not let the Hugging Face tokenizer add its special tokens (e.g. BOS) to each "
        "document. By default they are added, as Megatron-LM's HuggingFaceTokenizer does.",
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
        help="Number of tokenizer processes (Dataset.map num_proc). Default: 1.",
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

    start = time.time()
    files = expand_inputs(args.input)
    tokenizer = build_tokenizer(args)
    dataset = load_inputs(files, args.input_format, args.json_keys, args.cache_dir)
    print(f"Loaded {len(dataset)} documents from {len(files)} file(s).", flush=True)

    if args.workers > 1 and isinstance(tokenizer, HuggingFaceTokenizer):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_megatron_import()  # before forking the workers, and so its warnings stay quiet
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
    stats = write_outputs(tokenized, args.json_keys, args.output_prefix, tokenizer.vocab_size)

    elapsed = time.time() - start
    print(
        f"Done in {elapsed:.1f}s with tokenizer {tokenizer.name} "
        f"(vocab size {tokenizer.vocab_size})."
    )
    for key, st in stats.items():
        skipped = f", skipped {st.skipped_empty} empty" if st.skipped_empty else ""
        print(f"  [{key}] {st.documents} documents{skipped}, {st.tokens} tokens")
        for path in st.paths:
            print(f"    {path}")
    prefixes = " ".join(output_prefix_for(args.output_prefix, k) for k in args.json_keys)
    print(f"Train with: --data-path {prefixes}")
    if isinstance(tokenizer, ByteLevelTokenizer):
        print(
            f"  --tokenizer-type NullTokenizer --vocab-size {BYTE_LEVEL_VOCAB_SIZE} "
            f"(end-of-document id = vocab_size - 1 = {BYTE_LEVEL_EOD_ID})"
        )
    else:
        print(f"  --tokenizer-type HuggingFaceTokenizer --tokenizer-model {tokenizer.model_dir}")
    return stats


def main(argv: list[str] | None = None) -> int:
    """Command line entry point.

    Args:
        argv: Arguments without the program name; None means ``sys.argv[1:]``.

    Returns:
        The exit code: 0 on success, 1 on bad input (argparse exits with 2 on usage errors).
    """
    args = get_args(argv)
    try:
        run(args)
    except PreprocessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
