"""Parallel tokenization of tools/preprocess_data.py (mhc_megatron.data.encoding), --workers.

CPU only; ``main`` runs in-process and ``--workers 2`` forks two tokenizer processes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mhc_megatron.data import readers
from mhc_megatron.data.tokenizers import ByteLevelTokenizer
from tests.tools.data_helpers import FORK_WARNING, byte_ids, read_docs, tool_runner, write_jsonl


@pytest.fixture
def run_tool(tmp_path_factory, capsys):
    """``run_tool(*args) -> (exit code, stdout, stderr)`` of an in-process ``main``."""
    return tool_runner(tmp_path_factory, capsys)


@pytest.mark.filterwarnings(FORK_WARNING)
def test_multiple_files_glob_and_workers_match(tmp_path, run_tool, monkeypatch):
    """--workers 2 tokenizes in two other processes; output and order are those of --workers 1."""
    shards = [[f"shard {s} doc {i} " + "x" * (i % 7) for i in range(40)] for s in range(3)]
    for s, docs in enumerate(shards):
        write_jsonl(tmp_path / f"shard_{s}.jsonl", docs)
    expected = [byte_ids(d, True) for docs in shards for d in docs]
    # The file system's listing order is arbitrary: hand the tool the worst one, reversed.
    real_glob = readers.glob.glob
    monkeypatch.setattr(readers.glob, "glob", lambda *a, **k: sorted(real_glob(*a, **k))[::-1])
    # Each tokenizer call leaves its process id behind; forked workers inherit the patch.
    real_tokenize = ByteLevelTokenizer.tokenize_batch

    def tokenize_recording_pid(self, texts):
        (pid_dir / str(os.getpid())).touch()
        return real_tokenize(self, texts)

    monkeypatch.setattr(ByteLevelTokenizer, "tokenize_batch", tokenize_recording_pid)
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
