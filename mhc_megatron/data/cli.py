r"""Tokenize a text corpus into Megatron's indexed dataset format (``.bin`` / ``.idx``).

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
    python tools/preprocess_data.py --input 'data/*.jsonl' --output-prefix data/corpus \
        --tokenizer-type ByteLevel --append-eod --workers 8 --skip-bad-files

    python tools/preprocess_data.py --input 'data/*.jsonl' --output-prefix data/corpus \
        --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json \
        --merge-file gpt2-merges.txt --append-eod --workers 8

    python tools/preprocess_data.py --input 'data/*.jsonl' --output-prefix data/corpus \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tokenizer.model --append-eod
"""

from __future__ import annotations

import argparse
import sys
import time

from mhc_megatron.data.encoding import tokenize_dataset
from mhc_megatron.data.errors import PreprocessError
from mhc_megatron.data.readers import FORMATS, expand_inputs, load_inputs
from mhc_megatron.data.tokenizers import TOKENIZER_TYPES, build_tokenizer
from mhc_megatron.data.writer import output_prefix_for, quiet_megatron_import, write_outputs


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


def run(args: argparse.Namespace) -> dict:
    """Run the preprocessing.

    Args:
        args: Parsed command line arguments (see :func:`get_args`).

    Returns:
        Key to :class:`~mhc_megatron.data.writer.KeyStats`.

    Raises:
        PreprocessError: On bad arguments or inputs.
    """
    progress = not args.no_progress
    files = expand_inputs(args.input)
    tokenizer = build_tokenizer(args)
    # Before the clock starts (it takes seconds, whatever the corpus), and before forking the
    # workers so they do not import it again.
    quiet_megatron_import()
    start = time.perf_counter()
    corpus = load_inputs(
        files, args.input_format, args.json_keys, args.cache_dir, args.skip_bad_files, progress
    )
    dataset = corpus.dataset
    skipped = f" ({len(corpus.skipped)} bad file(s) skipped)" if corpus.skipped else ""
    print(f"Loaded {len(dataset)} documents from {len(corpus.files)} file(s){skipped}.", flush=True)
    loaded = time.perf_counter()

    tokenized = tokenize_dataset(
        dataset, tokenizer, args.json_keys, args.append_eod, args.workers, progress
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
