"""Tests for tools/preprocess_data.py (CPU only).

The script is imported from its path and its ``main`` called in-process, so megatron-core is
imported once per test session; one test runs it as a subprocess to cover the command line.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
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
def test_multiple_files_glob_and_workers_match(tmp_path, run_tool, tool, monkeypatch):
    """--workers 2 tokenizes in two other processes; output and order are those of --workers 1."""
    shards = [[f"shard {s} doc {i} " + "x" * (i % 7) for i in range(40)] for s in range(3)]
    for s, docs in enumerate(shards):
        write_jsonl(tmp_path / f"shard_{s}.jsonl", docs)
    expected = [byte_ids(d, True) for docs in shards for d in docs]
    # The file system's listing order is arbitrary: hand the tool the worst one, reversed.
    real_glob = tool.glob.glob
    monkeypatch.setattr(tool.glob, "glob", lambda *a, **k: sorted(real_glob(*a, **k))[::-1])
    # Each tokenizer call leaves its process id behind; forked workers inherit the patch.
    real_tokenize = tool.ByteLevelTokenizer.tokenize_batch

    def tokenize_recording_pid(self, texts):
        (pid_dir / str(os.getpid())).touch()
        return real_tokenize(self, texts)

    monkeypatch.setattr(tool.ByteLevelTokenizer, "tokenize_batch", tokenize_recording_pid)
    results = {}
    for workers in (1, 2):
        pid_dir = tmp_path / f"pids{workers}"
        pid_dir.mkdir()
        prefix = tmp_path / f"out{workers}" / "c"
        code, out, err = run_tool(
            "--input", tmp_path / "shard_*.jsonl", "--output-prefix", prefix,
            "--tokenizer-type", "ByteLevel", "--append-eod", "--workers", workers,
        )  # fmt: skip
        assert code == 0, err
        assert f"workers {workers}" in out
        pids = {int(p.name) for p in pid_dir.iterdir()}
        if workers == 1:
            assert pids == {os.getpid()}
        else:
            assert len(pids) == 2 and os.getpid() not in pids
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


def test_late_failure_leaves_no_partial_output(tmp_path, run_tool, tool, monkeypatch):
    """Interrupted while writing, after some documents: old outputs stay, no temporary files."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    out_dir = tmp_path / "out"
    common = ["--output-prefix", out_dir / "c", "--tokenizer-type", "ByteLevel"]
    assert run_tool("--input", write_jsonl(tmp_path / "old.jsonl", DOCS_B), *common)[0] == 0
    before = {name: (out_dir / name).read_bytes() for name in files_in(out_dir)}

    shards = [write_jsonl(tmp_path / f"s{i}.jsonl", DOCS_A * 20) for i in range(3)]
    real_add = IndexedDatasetBuilder.add_document
    seen = []

    def add_then_interrupt(self, tensor, lengths, modes=None):
        if len(seen) == 150:  # in the third file
            self.data_file.flush()
            seen.append({p.name: p.stat().st_size for p in out_dir.glob("*.tmp-*")})
            raise KeyboardInterrupt
        seen.append(None)
        real_add(self, tensor, lengths, modes)

    monkeypatch.setattr(IndexedDatasetBuilder, "add_document", add_then_interrupt)
    code, _, err = run_tool("--input", *shards, *common)
    assert code == 130 and "interrupted" in err
    # When it failed, a temporary .bin (no .idx yet) held the 150 documents written so far:
    # 50 times DOCS_A, as uint16 token ids.
    ((temp_name, temp_size),) = seen[-1].items()
    assert temp_name.startswith("c_text_document.bin.tmp-")
    assert temp_size == 50 * sum(len(d.encode()) for d in DOCS_A) * 2
    after = {name: (out_dir / name).read_bytes() for name in files_in(out_dir)}
    assert after == before  # no temporary file left, the previous outputs untouched


def test_progress_bars_and_throughput(tmp_path, run_tool):
    """Each stage shows a bar unless --no-progress; the summary gives docs/s and MB/s."""
    a = write_jsonl(tmp_path / "a.jsonl", DOCS_A)
    b = write_jsonl(tmp_path / "b.jsonl", DOCS_B)
    common = ["--input", a, b, "--tokenizer-type", "ByteLevel"]
    code, out, err = run_tool(*common, "--output-prefix", tmp_path / "out" / "bars")
    assert code == 0, err
    for stage in ("Loading", "Tokenizing", "Writing"):
        assert re.search(rf"{stage}: 100%\|", err), f"no finished {stage} bar in {err!r}"
    assert re.search(r"loading [\d.]+s, tokenizing [\d.]+s, writing [\d.]+s", out)
    megabytes = sum(len(d.encode()) for d in DOCS_A + DOCS_B) / 1e6
    assert re.search(r"Throughput: [\d,]+ docs/s, [\d.]+ MB/s", out)
    assert f"(5 documents, {megabytes:.2f} MB of text)" in out

    code, out, err = run_tool(*common, "--no-progress", "--output-prefix", tmp_path / "out" / "q")
    assert code == 0, err
    assert err == ""
    assert "Throughput:" in out


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
