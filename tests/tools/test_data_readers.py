"""Input files of tools/preprocess_data.py (mhc_megatron.data.readers): formats, order, bad files.

CPU only; ``main`` runs in-process.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tests.tools.data_helpers import (
    DOCS_A,
    DOCS_B,
    byte_ids,
    files_in,
    read_docs,
    write_jsonl,
)


def test_text_files_are_one_document_each(tmp_path, run_tool):
    texts = ["first file\nhas two lines\n", "second file ✓"]
    paths = []
    for i, text in enumerate(texts):
        paths.append(tmp_path / f"doc{i}.txt")
        paths[-1].write_text(text, encoding="utf-8")
    prefix = tmp_path / "out" / "txt"
    code, _, err = run_tool(
        "--input", *paths, "--output-prefix", prefix, "--tokenizer-type", "ByteLevel",
        "--append-eod",
    )  # fmt: skip
    assert code == 0, err
    assert read_docs(f"{prefix}_text_document") == [byte_ids(t, True) for t in texts]


def test_explicit_input_order_is_kept(tmp_path, run_tool):
    a = write_jsonl(tmp_path / "a.jsonl", DOCS_A)
    b = write_jsonl(tmp_path / "b.jsonl", DOCS_B)
    prefix = tmp_path / "out" / "ba"
    code, _, err = run_tool(
        "--input", b, a, "--output-prefix", prefix, "--tokenizer-type", "ByteLevel"
    )
    assert code == 0, err
    assert read_docs(f"{prefix}_text_document") == [byte_ids(d, False) for d in DOCS_B + DOCS_A]


def test_parquet_and_multiple_keys(tmp_path, run_tool):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "corpus.parquet"
    titles = [f"title {i}" for i in range(len(DOCS_A))]
    pq.write_table(pa.table({"body": DOCS_A, "title": titles, "n": [1, 2, 3]}), src)
    prefix = tmp_path / "out" / "pq"
    code, out, err = run_tool(
        "--input", src, "--json-keys", "body", "title", "--output-prefix", prefix,
        "--tokenizer-type", "ByteLevel", "--append-eod",
    )  # fmt: skip
    assert code == 0, err
    assert read_docs(f"{prefix}_body_document") == [byte_ids(d, True) for d in DOCS_A]
    assert read_docs(f"{prefix}_title_document") == [byte_ids(t, True) for t in titles]
    assert "--data-path" in out and f"{prefix}_title_document" in out


def _bad_files(directory: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """Write one input file per kind of bad contents, all refused or skipped (--skip-bad-files).

    Returns:
        Kind -> (path, texts its error must mention besides the path).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = [json.dumps({"text": f"doc {i}"}) + "\n" for i in range(6)]
    files = {
        "empty": ("empty.jsonl", b"", ("0 bytes",)),
        "blank": ("blank.jsonl", b"\n\n  \n", ("no documents",)),
        "broken": ("broken.jsonl", b'{"text": "ok"}\n{"text": "ok"}\nnot json\n', ("line 3",)),
        "nokey": ("nokey.jsonl", b'{"content": "a"}\n', ("'text'", "--json-keys")),
        "somekey": ("somekey.jsonl", b'{"text": "a"}\n{"content": "b"}\n', ("record 2", "'text'")),
        "numbers": ("numbers.jsonl", b'{"text": 1}\n{"text": 2}\n', ("not text",)),
        "allempty": ("allempty.jsonl", b'{"text": ""}\n{"text": ""}\n', ("'text'", "empty")),
        "blank_text": ("blank.txt", b"\n \n", ("'text'", "whitespace")),
        "latin1_json": ("latin1.jsonl", b'{"text": "a"}\n{"text": "\xe9"}\n', ("line 2", "UTF-8")),
        "latin1_text": ("latin1.txt", b"caf\xe9\n", ("UTF-8",)),
        "truncated_gz": (
            "truncated.jsonl.gz", gzip.compress("".join(lines).encode())[:-20], ("truncated",)
        ),
        "broken_gz": (
            "broken.jsonl.gz", gzip.compress("".join([*lines[:3], "{oops\n", *lines]).encode()),
            ("line 4",),
        ),
    }  # fmt: skip
    for name, data, _ in files.values():
        (directory / name).write_bytes(data)
    out = {kind: (directory / name, needles) for kind, (name, _, needles) in files.items()}
    pq.write_table(pa.table({"text": DOCS_A}), directory / "whole.parquet")
    data = (directory / "whole.parquet").read_bytes()
    (directory / "truncated.parquet").write_bytes(data[: len(data) // 2])
    out["truncated_parquet"] = (directory / "truncated.parquet", ("parquet",))
    return out


def _bad_arguments(directory: Path) -> dict[str, tuple[list[str], str]]:
    """Argument mistakes, always refused: name -> (arguments after --input, text of the error)."""
    (directory / "data.csv").write_text("text\nhello\n")
    (directory / "notes.txt").write_text("some text")
    return {
        "missing": ([str(directory / "missing.jsonl")], "missing.jsonl"),
        "glob": ([str(directory / "nothing_*.jsonl")], "nothing_*.jsonl"),
        "extension": ([str(directory / "data.csv")], "data.csv"),
        "textkey": ([str(directory / "notes.txt"), "--json-keys", "body"], "notes.txt"),
    }


BAD_FILES = [
    "empty", "blank", "broken", "nokey", "somekey", "numbers", "allempty", "blank_text",
    "latin1_json", "latin1_text", "truncated_gz", "broken_gz", "truncated_parquet",
]  # fmt: skip
BAD_ARGUMENTS = ["missing", "glob", "extension", "textkey"]


@pytest.mark.parametrize("case", BAD_FILES + BAD_ARGUMENTS)
def test_bad_input_fails_cleanly(tmp_path, run_tool, case):
    """Refused, naming the file (and line or record), after a good file, with nothing written."""
    good = write_jsonl(tmp_path / "good.jsonl", DOCS_A)
    if case in BAD_FILES:
        path, needles = _bad_files(tmp_path)[case]
        inputs = [str(path)]
        needles = (str(path), *needles)
    else:
        inputs, needle = _bad_arguments(tmp_path)[case]
        needles = (needle,)
    out_dir = tmp_path / "out"
    code, _, err = run_tool(
        "--input", good, *inputs, "--output-prefix", out_dir / "bad", "--tokenizer-type",
        "ByteLevel", "--append-eod",
    )  # fmt: skip
    assert code == 1
    for needle in needles:
        assert needle in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ")
    # Only a bad file can be skipped; an argument mistake must be fixed.
    assert ("--skip-bad-files" in last) == (case in BAD_FILES)
    assert files_in(out_dir) == []


def test_bad_files_are_all_named_and_can_be_skipped(tmp_path, run_tool):
    """All bad files are reported in one run; --skip-bad-files writes the good ones only."""
    bad = [str(path) for path, _ in _bad_files(tmp_path).values()]
    good_a = write_jsonl(tmp_path / "good_a.jsonl", DOCS_A)
    good_b = write_jsonl(tmp_path / "good_b.jsonl", DOCS_B)
    inputs = [*bad[:5], str(good_a), *bad[5:], str(good_b)]  # bad files first, between and last
    common = ["--tokenizer-type", "ByteLevel", "--input", *inputs]
    n_bad, n_files = len(bad), len(inputs)

    code, _, err = run_tool(*common, "--output-prefix", tmp_path / "refused" / "c")
    assert code == 1
    assert all(f"error: input file {path!r}" in err for path in bad), err
    last = err.strip().splitlines()[-1]
    assert f"{n_bad} of {n_files} input file(s) cannot be used" in last
    assert "--skip-bad-files" in last
    assert files_in(tmp_path / "refused") == []

    prefix = tmp_path / "skipped" / "c"
    code, out, err = run_tool(*common, "--skip-bad-files", "--output-prefix", prefix)
    assert code == 0, err
    assert read_docs(f"{prefix}_text_document") == [byte_ids(d, False) for d in DOCS_A + DOCS_B]
    assert f"from 2 file(s) ({n_bad} bad file(s) skipped)" in out
    assert all(f"warning: input file {path!r}" in err for path in bad), err
    summary = err[err.index(f"warning: skipped {n_bad} of {n_files} input file(s)") :]
    assert [line.split(": ")[0].strip() for line in summary.splitlines()[1:]] == bad

    code, _, err = run_tool(
        "--tokenizer-type", "ByteLevel", "--input", *bad[:2], "--skip-bad-files",
        "--output-prefix", tmp_path / "none" / "c",
    )  # fmt: skip
    assert code == 1 and "all 2 input file(s) are bad" in err
    assert files_in(tmp_path / "none") == []
