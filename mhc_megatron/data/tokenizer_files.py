"""Checks and readers of the tokenizer files named on the command line.

GPT-2 style ``vocab.json`` and ``merges.txt`` are read and checked here, before the ``tokenizers``
package sees them, so that a mistake (a missing file, swapped files, a merges file of another
vocabulary) is reported naming the flag and what to pass instead.
"""

from __future__ import annotations

import glob
import json
import os

from mhc_megatron.data.errors import PreprocessError


def check_tokenizer_file(flag: str, path: str, what: str, suffix: str = "") -> None:
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


def read_gpt2_vocab(path: str) -> dict[str, int]:
    """Read a GPT-2 style ``vocab.json``: a JSON object mapping each token to its id.

    Args:
        path: The ``--vocab-file`` value.

    Returns:
        Token to id.

    Raises:
        PreprocessError: If the file is missing or not such a JSON object.
    """
    check_tokenizer_file("--vocab-file", path, "GPT-2 style vocab.json", ".json")
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


def read_gpt2_merges(path: str, vocab: dict[str, int], vocab_path: str) -> list[tuple[str, str]]:
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
    check_tokenizer_file("--merge-file", path, "GPT-2 style merges.txt", ".txt")
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
