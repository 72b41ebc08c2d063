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


# --------------------------------------------------------------------------------------------
# GPT2BPETokenizer and SentencePieceTokenizer, compared with megatron-core's own tokenizers
# --------------------------------------------------------------------------------------------

# A few KB of training text for the tiny tokenizers, made here (no download).
WORDS = (
    "the quick brown fox jumps over lazy dog while seven wizards quietly hex bold jocks "
    "pack my box with five dozen liquor jugs sphinx of black quartz judge vow héllo wörld "
    "naïve café über straße data token model train document megatron residual stream"
).split()
TRAIN_LINES = [
    " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(8 + i % 5)) + f", {i * 13}."
    for i in range(150)
]
# Documents to tokenize: spaces and newlines in all positions, characters the tokenizers never
# saw in training (emoji, CJK), the special tokens' text, and a long document.
GPT_DOCS = [
    "the quick brown fox jumps over the lazy dog",
    "  leading spaces,  double  spaces and trailing ones  ",
    "line one\nline two\n\n\tindented 123 456",
    "héllo wörld ✓ 🎉 漢字 naïve café",
    "before<|endoftext|>after <|endoftext|>",
    " ".join(TRAIN_LINES[:40]),
]
SP_DOCS = [*GPT_DOCS[:4], "</s> and <s> are plain text here", GPT_DOCS[-1]]


@pytest.fixture(scope="module")
def tiny_bpe(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """GPT-2 style byte-level BPE files: vocab.json and merges.txt, with and without the
    ``<|endoftext|>`` token in the vocabulary."""
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed")
    out = {}
    for name, special in (("eod", ["<|endoftext|>"]), ("no_eod", [])):
        directory = tmp_path_factory.mktemp(f"bpe_{name}")
        bpe = tokenizers.ByteLevelBPETokenizer()
        bpe.train_from_iterator(
            TRAIN_LINES, vocab_size=400, min_frequency=2, special_tokens=special,
            show_progress=False,
        )  # fmt: skip
        bpe.save_model(str(directory))
        out[name] = (directory / "vocab.json", directory / "merges.txt")
    return out


@pytest.fixture(scope="module")
def tiny_sp(tmp_path_factory) -> dict[str, Path]:
    """SentencePiece models: a normal one (</s> = id 2) and one trained without an eos piece."""
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece is not installed")
    directory = tmp_path_factory.mktemp("sp")
    out = {}
    for name, extra in (("eod", {}), ("no_eos", {"eos_id": -1})):
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(TRAIN_LINES), model_prefix=str(directory / name),
            vocab_size=150, minloglevel=2, **extra,
        )  # fmt: skip
        out[name] = directory / f"{name}.model"
    return out


def megatron_tokenizer(monkeypatch, *flags: str | Path):
    """Build the tokenizer that Megatron training builds from these tokenizer flags.

    The flags go through megatron-core's own argument parser (so every other tokenizer option
    has its training default) and ``build_tokenizer``, as ``pretrain_mhc.py`` does.
    """
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training.arguments import parse_args

    monkeypatch.setattr(sys, "argv", ["pretrain_mhc.py", *map(str, flags)])
    return build_tokenizer(parse_args(ignore_unknown_args=True))


def megatron_gpt2_tokenizer(monkeypatch, tmp_path: Path, vocab: Path, merges: Path):
    """megatron-core 0.19.2's GPT2BPETokenizer for these files, built without the network.

    megatron-core builds it with ``AutoTokenizer.from_pretrained("gpt2", vocab_file=...,
    merges_file=...)``, which fetches the Hugging Face Hub's ``gpt2`` configuration. Here "gpt2"
    is replaced by a local directory with what that configuration says (model type gpt2, 1024
    positions); the rest of megatron-core's and transformers' code runs as in training. The
    Hub repository also holds GPT-2's own ``tokenizer.json``, which transformers 5 would load
    instead of the files given; it is left out so that the files given are the ones used.
    """
    from megatron.core.tokenizers.text.libraries import megatron_hf_tokenizer

    config_dir = tmp_path / "gpt2_config"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (config_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))
    gpt2 = dict(megatron_hf_tokenizer.MEGATRON_CONFIG_MAP["GPT2BPETokenizer"])
    gpt2["tokenizer_name"] = str(config_dir)
    monkeypatch.setitem(megatron_hf_tokenizer.MEGATRON_CONFIG_MAP, "GPT2BPETokenizer", gpt2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return megatron_tokenizer(
            monkeypatch, "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab,
            "--merge-file", merges,
        )  # fmt: skip


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("vocab_kind", ["eod", "no_eod"])
def test_gpt2_bpe_matches_megatron(tmp_path, run_tool, monkeypatch, tiny_bpe, vocab_kind):
    """The ids are those of megatron-core's GPT2BPETokenizer, <|endoftext|> appended."""
    vocab, merges = tiny_bpe[vocab_kind]
    megatron = megatron_gpt2_tokenizer(monkeypatch, tmp_path, vocab, merges)
    token_ids = json.loads(vocab.read_text())
    # The trained vocabulary has <|endoftext|> first; without it transformers appends it.
    eod = token_ids["<|endoftext|>"] if vocab_kind == "eod" else len(token_ids)
    assert megatron.eod == eod
    assert megatron.vocab_size == len(token_ids) + (vocab_kind == "no_eod")

    src = write_jsonl(tmp_path / "c.jsonl", GPT_DOCS)
    prefix = tmp_path / "out" / "gpt"
    code, out, err = run_tool(
        "--input", src, "--output-prefix", prefix, "--tokenizer-type", "GPT2BPETokenizer",
        "--vocab-file", vocab, "--merge-file", merges, "--append-eod", "--workers", "2",
    )  # fmt: skip
    assert code == 0, err
    docs = read_docs(f"{prefix}_text_document")
    expected = [megatron.tokenize(d) + [eod] for d in GPT_DOCS]
    assert docs == expected
    # The BPE merged something (not one id per byte), and <|endoftext|> in the text is the token.
    assert len(docs[0]) < len(GPT_DOCS[0].encode()) / 2
    assert docs[4].count(eod) == 3
    assert load_indexed(f"{prefix}_text_document").index.dtype == np.uint16
    assert f"vocab size {megatron.vocab_size}" in out
    assert (
        f"--tokenizer-type GPT2BPETokenizer --vocab-file {vocab} --merge-file {merges} "
        f"(end-of-document id {eod} = <|endoftext|>"
    ) in out


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("append_eod", [True, False])
def test_sentencepiece_matches_megatron(tmp_path, run_tool, monkeypatch, tiny_sp, append_eod):
    """The ids are those of megatron-core's SentencePieceTokenizer: no BOS/EOS, eos_id appended."""
    import sentencepiece as spm

    model = tiny_sp["eod"]
    megatron = megatron_tokenizer(
        monkeypatch, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model
    )
    processor = spm.SentencePieceProcessor(model_file=str(model))
    assert megatron.eod == processor.eos_id() == 2
    assert megatron.vocab_size == processor.get_piece_size() == 150

    src = write_jsonl(tmp_path / "c.jsonl", SP_DOCS)
    prefix = tmp_path / "out" / "sp"
    flags = ["--append-eod", "--workers", "2"] if append_eod else []
    code, out, err = run_tool(
        "--input", src, "--output-prefix", prefix, "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", model, *flags,
    )  # fmt: skip
    assert code == 0, err
    docs = read_docs(f"{prefix}_text_document")
    assert docs == [megatron.tokenize(d) + [2] * append_eod for d in SP_DOCS]
    assert all(d[0] != processor.bos_id() for d in docs)
    assert processor.unk_id() in docs[3]  # emoji and CJK are unknown to this model
    assert len(docs[0]) < len(SP_DOCS[0].encode()) / 2
    assert (
        f"--tokenizer-type SentencePieceTokenizer --tokenizer-model {model} "
        "(end-of-document id 2 = </s>)"
    ) in out


def _bad_tokenizer_arguments(directory: Path, bpe: tuple[Path, Path], sp: dict[str, Path]):
    """Tokenizer mistakes: name -> (tokenizer arguments, texts the error must hold)."""
    vocab, merges = (str(p) for p in bpe)
    files = {
        "list.json": "[1, 2]",
        "string_ids.json": json.dumps({"a": "1"}),
        "bad_merges.txt": "#version: 0.2\nĠ t\nthree parts here\n",
        "empty.txt": "",
        "foreign_merges.txt": "#version: 0.2\nq z\n",
        "not_a_model.model": "not a protobuf",
    }
    for name, text in files.items():
        (directory / name).write_text(text)
    (directory / "models").mkdir()
    (directory / "models" / "tiny.model").write_bytes(sp["eod"].read_bytes())
    d = {name: str(directory / name) for name in [*files, "models"]}
    d["absent"] = str(directory / "absent.json")
    gpt2 = ["--tokenizer-type", "GPT2BPETokenizer"]
    gpt2_files = [*gpt2, "--vocab-file", vocab, "--merge-file", merges]
    sp_type = ["--tokenizer-type", "SentencePieceTokenizer"]
    sp_model = [*sp_type, "--tokenizer-model", str(sp["eod"])]
    hf = ["--tokenizer-type", "HuggingFaceTokenizer"]
    eod = json.loads(bpe[0].read_text())["<|endoftext|>"]
    return {
        "gpt2_no_files": (gpt2, ["needs --vocab-file and --merge-file"]),
        "gpt2_no_merges": ([*gpt2, "--vocab-file", vocab], ["needs --merge-file:"]),
        "gpt2_absent_vocab": (
            [*gpt2, "--vocab-file", d["absent"], "--merge-file", merges],
            [f"--vocab-file {d['absent']!r} does not exist"],
        ),
        "gpt2_vocab_is_dir": (
            [*gpt2, "--vocab-file", str(bpe[0].parent), "--merge-file", merges],
            ["is a directory", repr(vocab)],
        ),
        "gpt2_swapped": (
            [*gpt2, "--vocab-file", merges, "--merge-file", vocab],
            [repr(merges), "not valid JSON", "did you swap --vocab-file and --merge-file"],
        ),
        "gpt2_vocab_list": (
            [*gpt2, "--vocab-file", d["list.json"], "--merge-file", merges],
            ["holds a JSON list", "mapping each token to its id"],
        ),
        "gpt2_vocab_string_ids": (
            [*gpt2, "--vocab-file", d["string_ids.json"], "--merge-file", merges],
            ["maps 'a' to '1'", "integer"],
        ),
        "gpt2_bad_merges": (
            [*gpt2, "--vocab-file", vocab, "--merge-file", d["bad_merges.txt"]],
            ["line 3 is 'three parts here'", "two tokens separated by one space"],
        ),
        "gpt2_empty_merges": (
            [*gpt2, "--vocab-file", vocab, "--merge-file", d["empty.txt"]],
            [repr(d["empty.txt"]), "holds no merge"],
        ),
        "gpt2_other_merges": (
            [*gpt2, "--vocab-file", vocab, "--merge-file", d["foreign_merges.txt"]],
            [f"does not belong to --vocab-file {vocab!r}", "line 2 ('q z') makes token 'qz'"],
        ),
        "gpt2_tokenizer_model": (
            [*gpt2_files, "--tokenizer-model", str(sp["eod"])],
            ["--tokenizer-model is not used by --tokenizer-type GPT2BPETokenizer; drop it"],
        ),
        "gpt2_no_add_special_tokens": (
            [*gpt2_files, "--no-add-special-tokens"],
            ["--no-add-special-tokens is not used by --tokenizer-type GPT2BPETokenizer"],
        ),
        "gpt2_other_eod": (
            [*gpt2_files, "--eod-id", str(eod + 1)],
            [f"always uses end-of-document id {eod} (<|endoftext|>)", "drop --eod-id"],
        ),
        "gpt2_eod_outside": (
            [*gpt2_files, "--eod-id", "400"],
            ["--eod-id 400 is outside the tokenizer's vocabulary (0..399)"],
        ),
        "sp_no_model": (sp_type, ["needs --tokenizer-model <.model file>"]),
        "sp_absent": (
            [*sp_type, "--tokenizer-model", d["absent"]],
            [f"--tokenizer-model {d['absent']!r} does not exist"],
        ),
        "sp_dir": (
            [*sp_type, "--tokenizer-model", d["models"]],
            ["is a directory", repr(str(directory / "models" / "tiny.model"))],
        ),
        "sp_not_a_model": (
            [*sp_type, "--tokenizer-model", d["not_a_model.model"]],
            [repr(d["not_a_model.model"]), "is not a SentencePiece model"],
        ),
        "sp_vocab_file": (
            [*sp_model, "--vocab-file", vocab],
            ["--vocab-file is not used by --tokenizer-type SentencePieceTokenizer", "drop it"],
        ),
        "sp_other_eod": (
            [*sp_model, "--eod-id", "1"],
            ["always uses end-of-document id 2", "drop --eod-id"],
        ),
        "sp_eod_outside": ([*sp_model, "--eod-id", "-1"], ["outside the tokenizer's vocabulary"]),
        "sp_no_eos": (
            [*sp_type, "--tokenizer-model", str(sp["no_eos"])],
            ["has no end-of-sentence piece (eos_id -1)", "drop --append-eod"],
        ),
        "byte_level_merge_file": (
            ["--tokenizer-type", "ByteLevel", "--merge-file", merges],
            ["--merge-file is not used by --tokenizer-type ByteLevel", "GPT2BPETokenizer"],
        ),
        "hf_vocab_file": (
            [*hf, "--tokenizer-model", str(directory), "--vocab-file", vocab],
            ["--vocab-file is not used by --tokenizer-type HuggingFaceTokenizer"],
        ),
        "hf_given_sp_model": (
            [*hf, "--tokenizer-model", str(sp["eod"])],
            ["is not a directory", "use --tokenizer-type SentencePieceTokenizer"],
        ),
    }


BAD_TOKENIZER_ARGUMENTS = [
    "gpt2_no_files", "gpt2_no_merges", "gpt2_absent_vocab", "gpt2_vocab_is_dir", "gpt2_swapped",
    "gpt2_vocab_list", "gpt2_vocab_string_ids", "gpt2_bad_merges", "gpt2_empty_merges",
    "gpt2_other_merges", "gpt2_tokenizer_model", "gpt2_no_add_special_tokens", "gpt2_other_eod",
    "gpt2_eod_outside", "sp_no_model", "sp_absent", "sp_dir", "sp_not_a_model", "sp_vocab_file",
    "sp_other_eod", "sp_eod_outside", "sp_no_eos", "byte_level_merge_file", "hf_vocab_file",
    "hf_given_sp_model",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_TOKENIZER_ARGUMENTS)
def test_bad_tokenizer_arguments(tmp_path, run_tool, tiny_bpe, tiny_sp, case):
    """Refused before reading the input, saying what to change, with nothing written."""
    cases = _bad_tokenizer_arguments(tmp_path, tiny_bpe["eod"], tiny_sp)
    assert sorted(cases) == sorted(BAD_TOKENIZER_ARGUMENTS)
    arguments, needles = cases[case]
    good = write_jsonl(tmp_path / "good.jsonl", DOCS_A)
    code, _, err = run_tool(
        "--input", good, "--output-prefix", tmp_path / "out" / "x", *arguments, "--append-eod"
    )
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    assert files_in(tmp_path / "out") == []


@pytest.mark.parametrize(
    ("module", "arguments"),
    [
        ("tokenizers", ["GPT2BPETokenizer", "--vocab-file", "v.json", "--merge-file", "m.txt"]),
        ("sentencepiece", ["SentencePieceTokenizer", "--tokenizer-model", "x.model"]),
    ],
)
def test_new_tokenizers_need_their_package(tmp_path, run_tool, monkeypatch, module, arguments):
    good = write_jsonl(tmp_path / "good.jsonl", DOCS_A)
    monkeypatch.setitem(sys.modules, module, None)  # makes `import <module>` fail
    code, _, err = run_tool(
        "--input", good, "--output-prefix", tmp_path / "out" / "x", "--tokenizer-type", *arguments
    )
    assert code == 1 and f"pip install {module}" in err
