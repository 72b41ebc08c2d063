"""The command line of tools/preprocess_data.py (mhc_megatron.data.cli): exit codes, messages.

CPU only. One test starts the script as a subprocess; the others run it in-process.
"""

from __future__ import annotations

import re
import runpy
import subprocess
import sys

import pytest

from tests.tools.data_helpers import (
    DOCS_A,
    DOCS_B,
    SCRIPT,
    byte_ids,
    read_docs,
    write_jsonl,
)


def test_command_line(tmp_path):
    """The script runs from any directory (the package is installed, no sys.path edits)."""
    src = write_jsonl(tmp_path / "c.jsonl", DOCS_B)
    prefix = tmp_path / "out" / "cli"
    cmd = [
        sys.executable, str(SCRIPT), "--input", str(src), "--output-prefix", str(prefix),
        "--tokenizer-type", "ByteLevel", "--append-eod", "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "2 documents" in proc.stdout
    assert read_docs(f"{prefix}_text_document") == [byte_ids(d, True) for d in DOCS_B]


def test_script_exits_with_the_error_code(tmp_path, monkeypatch, capsys):
    """The script turns main()'s return value into its exit code (run in-process)."""
    args = ["--input", str(tmp_path / "absent.jsonl"), "--output-prefix", str(tmp_path / "x")]
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args, "--tokenizer-type", "ByteLevel"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert exit_info.value.code == 1
    assert "absent.jsonl" in capsys.readouterr().err


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
