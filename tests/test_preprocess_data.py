"""Tests for tools/preprocess_data.py (CPU only).

The script is imported from its path and its ``main`` called in-process, so megatron-core is
imported once per test session; one test runs it as a subprocess to cover the command line.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "tools" / "preprocess_data.py"
EOD = 256

DOCS_A = ["Hello, world!", "héllo wörld — ünïcode ✓", "line one\nline two\n"]
DOCS_B = ["second file, first doc", "second file, second doc"]


@pytest.fixture(scope="session")
def tool():
    """The preprocess_data module, imported from its path (registered so workers can unpickle)."""
    spec = importlib.util.spec_from_file_location("preprocess_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["preprocess_data"] = module
    spec.loader.exec_module(module)
    module._quiet_megatron_import()
    return module


@pytest.fixture
def cache_dir(tmp_path_factory):
    """A fresh, private Hugging Face datasets cache."""
    return str(tmp_path_factory.mktemp("hf_datasets_cache"))


@pytest.fixture
def run_tool(tool, tmp_path_factory, capsys):
    """Call the tool's main(); returns (exit code, stdout, stderr).

    Every call gets a fresh datasets cache: datasets would otherwise reuse the tokenized result of
    an earlier call (its cache key ignores num_proc), and the code under test would not run.
    """

    def _run(*args: str) -> tuple[int, str, str]:
        cache = str(tmp_path_factory.mktemp("hf_datasets_cache"))
        code = tool.main([*map(str, args), "--cache-dir", cache])
        out, err = capsys.readouterr()
        return code, out, err

    return _run


def load_indexed(prefix: str | Path):
    """Open an output dataset with megatron-core's reader."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron warns that it cannot determine the rank
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        return IndexedDataset(str(prefix))


def read_docs(prefix: str | Path) -> list[list[int]]:
    """All sequences of an output dataset as lists, checking one sequence per document."""
    ds = load_indexed(prefix)
    np.testing.assert_array_equal(ds.document_indices, np.arange(len(ds) + 1))
    return [ds[i].tolist() for i in range(len(ds))]


def byte_ids(text: str, eod: bool) -> list[int]:
    """Expected ByteLevel ids of a text."""
    return list(text.encode("utf-8")) + ([EOD] if eod else [])


def write_jsonl(path: Path, docs: list[str], key: str = "text") -> Path:
    """Write one JSON object per line."""
    path.write_text("".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def files_in(directory: Path) -> list[str]:
    """Names of all files under a directory (empty when it does not exist)."""
    if not directory.exists():
        return []
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


@pytest.mark.parametrize("append_eod", [True, False])
def test_jsonl_round_trip(tmp_path, run_tool, append_eod):
    src = write_jsonl(tmp_path / "corpus.jsonl", DOCS_A)
    prefix = tmp_path / "out" / "corpus"
    flags = ["--append-eod"] if append_eod else []
    code, out, err = run_tool(
        "--input", src, "--output-prefix", prefix, "--tokenizer-type", "ByteLevel", *flags
    )
    assert code == 0, err
    assert files_in(tmp_path / "out") == ["corpus_text_document.bin", "corpus_text_document.idx"]
    docs = read_docs(f"{prefix}_text_document")
    assert docs == [byte_ids(d, append_eod) for d in DOCS_A]
    assert load_indexed(f"{prefix}_text_document").index.dtype == np.uint16
    n_tokens = sum(len(d) for d in docs)
    assert "3 documents" in out and f"{n_tokens} tokens" in out
    assert f"{prefix}_text_document.bin" in out and f"{prefix}_text_document.idx" in out
    assert "--tokenizer-type NullTokenizer --vocab-size 257" in out


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


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_multiple_files_glob_and_workers_match(tmp_path, run_tool):
    shards = [[f"shard {s} doc {i} " + "x" * (i % 7) for i in range(40)] for s in range(3)]
    for s, docs in enumerate(shards):
        write_jsonl(tmp_path / f"shard_{s}.jsonl", docs)
    expected = [byte_ids(d, True) for docs in shards for d in docs]
    results = {}
    for workers in (1, 2):
        prefix = tmp_path / f"out{workers}" / "c"
        code, _, err = run_tool(
            "--input", tmp_path / "shard_*.jsonl", "--output-prefix", prefix,
            "--tokenizer-type", "ByteLevel", "--append-eod", "--workers", workers,
        )  # fmt: skip
        assert code == 0, err
        assert workers == 1 or "num_proc=2" in err
        assert read_docs(f"{prefix}_text_document") == expected
        results[workers] = [
            Path(f"{prefix}_text_document{ext}").read_bytes() for ext in (".bin", ".idx")
        ]
    assert results[1] == results[2]


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


def test_empty_documents_are_skipped(tmp_path, run_tool):
    src = write_jsonl(tmp_path / "gaps.jsonl", ["a", "", "b"])
    prefix = tmp_path / "out" / "gaps"
    code, out, err = run_tool(
        "--input", src, "--output-prefix", prefix, "--tokenizer-type", "ByteLevel", "--append-eod"
    )
    assert code == 0, err
    assert read_docs(f"{prefix}_text_document") == [[97, EOD], [98, EOD]]
    assert "skipped 1 empty" in out


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Bad input cases: name -> (arguments, text the error must mention).

    The arguments start with ``--input <bad file>``.
    """
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n  \n")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": "ok"}\nnot json\n')
    write_jsonl(tmp_path / "nokey.jsonl", ["a", "b"], key="content")
    (tmp_path / "somekey.jsonl").write_text('{"text": "a"}\n{"content": "b"}\n')
    (tmp_path / "numbers.jsonl").write_text('{"text": 1}\n{"text": 2}\n')
    write_jsonl(tmp_path / "allempty.jsonl", ["", ""])
    (tmp_path / "data.csv").write_text("text\nhello\n")
    (tmp_path / "notes.txt").write_text("some text")
    return {
        "missing": (["--input", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        "glob": (["--input", str(tmp_path / "nothing_*.jsonl")], "nothing_*.jsonl"),
        "empty": (["--input", str(tmp_path / "empty.jsonl")], "empty.jsonl"),
        "blank": (["--input", str(tmp_path / "blank.jsonl")], "blank.jsonl"),
        "broken": (["--input", str(tmp_path / "broken.jsonl")], "broken.jsonl"),
        "nokey": (["--input", str(tmp_path / "nokey.jsonl")], "nokey.jsonl"),
        "somekey": (["--input", str(tmp_path / "somekey.jsonl")], "somekey.jsonl"),
        "numbers": (["--input", str(tmp_path / "numbers.jsonl")], "numbers.jsonl"),
        "allempty": (["--input", str(tmp_path / "allempty.jsonl")], "'text'"),
        "extension": (["--input", str(tmp_path / "data.csv")], "data.csv"),
        "textkey": (
            ["--input", str(tmp_path / "notes.txt"), "--json-keys", "body"],
            "notes.txt",
        ),
    }


BAD_CASES = [
    "missing", "glob", "empty", "blank", "broken", "nokey", "somekey", "numbers", "allempty",
    "extension", "textkey",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_fails_cleanly(tmp_path, run_tool, case):
    extra, needle = _bad_inputs(tmp_path)[case]
    if case != "allempty":  # that one must fail while writing, so give it no text at all
        # A good file too, whose documents must not end up half-written.
        good = write_jsonl(tmp_path / "good.jsonl", DOCS_A)
        extra = [*extra[:2], str(good), *extra[2:]]
    out_dir = tmp_path / "out"
    code, _, err = run_tool(
        *extra, "--output-prefix", out_dir / "bad", "--tokenizer-type", "ByteLevel", "--append-eod"
    )
    assert code != 0
    assert needle in err, err
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert files_in(out_dir) == []


def test_broken_jsonl_reports_line(tmp_path, run_tool):
    _bad_inputs(tmp_path)
    code, _, err = run_tool(
        "--input", tmp_path / "broken.jsonl", "--output-prefix", tmp_path / "out" / "x",
        "--tokenizer-type", "ByteLevel",
    )  # fmt: skip
    assert code == 1
    assert "line 3" in err


def test_missing_key_reports_record(tmp_path, run_tool):
    _bad_inputs(tmp_path)
    code, _, err = run_tool(
        "--input", tmp_path / "somekey.jsonl", "--output-prefix", tmp_path / "out" / "x",
        "--tokenizer-type", "ByteLevel",
    )  # fmt: skip
    assert code == 1
    assert "record 2" in err and "'text'" in err


def test_failure_keeps_previous_outputs(tmp_path, run_tool):
    good = write_jsonl(tmp_path / "good.jsonl", DOCS_A)
    write_jsonl(tmp_path / "allempty.jsonl", ["", ""])
    prefix = tmp_path / "out" / "c"
    common = ["--output-prefix", prefix, "--tokenizer-type", "ByteLevel"]
    assert run_tool("--input", good, *common)[0] == 0
    before = {name: (tmp_path / "out" / name).read_bytes() for name in files_in(tmp_path / "out")}
    # Fails while writing (after the builders opened their temporary files).
    code, _, err = run_tool("--input", tmp_path / "allempty.jsonl", *common)
    assert code == 1 and "no document has any text" in err
    after = {name: (tmp_path / "out" / name).read_bytes() for name in files_in(tmp_path / "out")}
    assert after == before


def test_byte_level_rejects_tokenizer_model(tmp_path, run_tool):
    good = write_jsonl(tmp_path / "good.jsonl", DOCS_A)
    code, _, err = run_tool(
        "--input", good, "--output-prefix", tmp_path / "out" / "x", "--tokenizer-type",
        "ByteLevel", "--tokenizer-model", tmp_path,
    )  # fmt: skip
    assert code == 1 and "--tokenizer-model" in err
    assert files_in(tmp_path / "out") == []


def test_hf_tokenizer_needs_transformers(tmp_path, run_tool, monkeypatch):
    good = write_jsonl(tmp_path / "good.jsonl", DOCS_A)
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    code, _, err = run_tool(
        "--input", good, "--output-prefix", tmp_path / "out" / "x", "--tokenizer-type",
        "HuggingFaceTokenizer", "--tokenizer-model", tmp_path,
    )  # fmt: skip
    assert code == 1 and "pip install transformers" in err


def _save_tiny_hf_tokenizer(path: Path, with_eos: bool) -> None:
    """Save a WordLevel tokenizer over a handful of words with save_pretrained."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed")
    words = ["[UNK]", "<eos>", "hello", "world", "the", "quick", "fox", ",", "!"]
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    kwargs = {"eos_token": "<eos>"} if with_eos else {}
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", **kwargs)
    hf.save_pretrained(str(path))


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_hf_tokenizer_round_trip(tmp_path, run_tool):
    tok_dir = tmp_path / "tok"
    _save_tiny_hf_tokenizer(tok_dir, with_eos=True)
    docs = ["hello world !", "the quick fox , hello", "unknown words here"]
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    prefix = tmp_path / "out" / "hf"
    code, out, err = run_tool(
        "--input", src, "--output-prefix", prefix, "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", tok_dir, "--append-eod", "--workers", "2",
    )  # fmt: skip
    assert code == 0, err
    assert read_docs(f"{prefix}_text_document") == [
        [2, 3, 8, 1],
        [4, 5, 6, 7, 2, 1],
        [0, 0, 0, 1],
    ]
    assert "HuggingFaceTokenizer" in out


def test_hf_tokenizer_without_eos_needs_eod_id(tmp_path, run_tool):
    tok_dir = tmp_path / "tok"
    _save_tiny_hf_tokenizer(tok_dir, with_eos=False)
    src = write_jsonl(tmp_path / "c.jsonl", ["hello world"])
    args = [
        "--input", src, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok_dir,
        "--append-eod",
    ]  # fmt: skip
    code, _, err = run_tool(*args, "--output-prefix", tmp_path / "out" / "x")
    assert code == 1 and "--eod-id" in err and str(tok_dir) in err
    assert files_in(tmp_path / "out") == []
    prefix = tmp_path / "out2" / "x"
    code, _, err = run_tool(*args, "--eod-id", "1", "--output-prefix", prefix)
    assert code == 0, err
    assert read_docs(f"{prefix}_text_document") == [[2, 3, 1]]


def test_command_line(tmp_path, cache_dir):
    src = write_jsonl(tmp_path / "c.jsonl", DOCS_B)
    prefix = tmp_path / "out" / "cli"
    cmd = [
        sys.executable, str(SCRIPT), "--input", str(src), "--output-prefix", str(prefix),
        "--tokenizer-type", "ByteLevel", "--append-eod", "--cache-dir", cache_dir,
    ]  # fmt: skip
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "2 documents" in proc.stdout
    assert read_docs(f"{prefix}_text_document") == [byte_ids(d, True) for d in DOCS_B]

    cmd[cmd.index(str(src))] = str(tmp_path / "absent.jsonl")
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "absent.jsonl" in proc.stderr
