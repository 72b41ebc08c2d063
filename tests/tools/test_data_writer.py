"""Output of tools/preprocess_data.py (mhc_megatron.data.writer): the .bin/.idx files.

CPU only; ``main`` runs in-process and the outputs are read back with megatron-core's reader.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.tools.data_helpers import (
    DOCS_A,
    DOCS_B,
    EOD,
    byte_ids,
    files_in,
    load_indexed,
    read_docs,
    write_jsonl,
)


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


def test_empty_documents_are_skipped(tmp_path, run_tool):
    src = write_jsonl(tmp_path / "gaps.jsonl", ["a", "", "b"])
    prefix = tmp_path / "out" / "gaps"
    code, out, err = run_tool(
        "--input", src, "--output-prefix", prefix, "--tokenizer-type", "ByteLevel", "--append-eod"
    )
    assert code == 0, err
    assert read_docs(f"{prefix}_text_document") == [[97, EOD], [98, EOD]]
    assert "skipped 1 empty" in out


def test_late_failure_leaves_no_partial_output(tmp_path, run_tool, monkeypatch):
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
