"""The tokenizers: ids as Megatron's tokenizer of the same ``--tokenizer-type`` makes them.

Each tokenizer has ``name``, ``vocab_size``, ``eod`` (the end-of-document id),
``tokenize_batch(texts)`` and ``training_flags()``. :func:`build_tokenizer` makes the one the
command line selects and checks its end-of-document id.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from mhc_megatron.data.errors import PreprocessError
from mhc_megatron.data.tokenizer_files import (
    check_tokenizer_file,
    read_gpt2_merges,
    read_gpt2_vocab,
)

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
            One 1-D uint8 array of byte values per text, shape ``(len(text.encode()),)``.
        """
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def training_flags(self) -> str:
        """Return Megatron's tokenizer flags for training on the output."""
        return (
            f"--tokenizer-type NullTokenizer --vocab-size {BYTE_LEVEL_VOCAB_SIZE} "
            f"(end-of-document id = vocab_size - 1 = {BYTE_LEVEL_EOD_ID})"
        )


class HuggingFaceTokenizer:
    """Wrapper around a local ``transformers`` tokenizer."""

    name = "HuggingFaceTokenizer"

    def __init__(self, model_dir: str, eod_id: int | None, add_special_tokens: bool) -> None:
        """Load the tokenizer with ``AutoTokenizer.from_pretrained(model_dir)``, offline.

        Args:
            model_dir: Local directory holding the tokenizer files (as written by
                ``save_pretrained``).
            eod_id: End-of-document id overriding the tokenizer's ``eos_token_id``.
            add_special_tokens: Whether the tokenizer adds its special tokens (e.g. BOS), as
                Megatron-LM's HuggingFaceTokenizer does.

        Raises:
            PreprocessError: If ``transformers`` is missing or the directory cannot be loaded.
        """
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
            One list of int token ids per text (its length the text's number of tokens).
        """
        out = self.tokenizer(texts, add_special_tokens=self.add_special_tokens, verbose=False)
        return out["input_ids"]

    def training_flags(self) -> str:
        """Return Megatron's tokenizer flags for training on the output."""
        return f"--tokenizer-type HuggingFaceTokenizer --tokenizer-model {self.model_dir}"


class GPT2BPETokenizer:
    """GPT-2 style byte-level BPE from a ``vocab.json`` and a ``merges.txt``.

    Built with the ``tokenizers`` package exactly as ``transformers``' ``GPT2Tokenizer`` builds
    its backend (no prefix space, no dropout, ``<|endoftext|>`` a special token), which
    megatron-core's GPT2BPETokenizer wraps. No special tokens are added to a document.
    """

    name = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        """Read and check the two files, then build the BPE.

        Args:
            vocab_file: The ``vocab.json`` (``--vocab-file``).
            merge_file: The ``merges.txt`` (``--merge-file``).

        Raises:
            PreprocessError: If ``tokenizers`` is missing or the files are not a GPT-2 style
                BPE.
        """
        try:
            import tokenizers
        except ImportError as exc:
            raise PreprocessError(
                "--tokenizer-type GPT2BPETokenizer needs the 'tokenizers' package: run "
                "`pip install tokenizers`"
            ) from exc
        from tokenizers import decoders, models, pre_tokenizers

        vocab = read_gpt2_vocab(vocab_file)
        merges = read_gpt2_merges(merge_file, vocab, vocab_file)
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
            One list of int token ids per text (its length the text's number of tokens).
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
    """

    name = "SentencePieceTokenizer"

    def __init__(self, model_file: str) -> None:
        """Load the model with ``sentencepiece.SentencePieceProcessor``.

        Args:
            model_file: The ``.model`` file (``--tokenizer-model``).

        Raises:
            PreprocessError: If ``sentencepiece`` is missing or the file is not a SentencePiece
                model.
        """
        try:
            import sentencepiece
        except ImportError as exc:
            raise PreprocessError(
                "--tokenizer-type SentencePieceTokenizer needs the 'sentencepiece' package: run "
                "`pip install sentencepiece`"
            ) from exc
        check_tokenizer_file("--tokenizer-model", model_file, "SentencePiece .model", ".model")
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
            One list of int token ids per text (its length the text's number of tokens).
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
