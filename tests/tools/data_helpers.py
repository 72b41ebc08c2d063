"""What the preprocessing tests share: sample documents, an in-process runner, output readers.

``main`` runs in-process (megatron-core is imported once per test session); only
``test_preprocess_cli.py`` starts ``tools/preprocess_data.py`` as a subprocess.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mhc_megatron.data.cli import main
from mhc_megatron.data.writer import quiet_megatron_import
from tests.launching import REPO_ROOT

SCRIPT = REPO_ROOT / "tools" / "preprocess_data.py"
EOD = 256  # ByteLevel's end-of-document id: NullTokenizer's with --vocab-size 257
DOCS_A = ["Hello, world!", "héllo wörld — ünïcode ✓", "line one\nline two\n"]
DOCS_B = ["second file, first doc", "second file, second doc"]
# Python warns on fork() in a multi-threaded process, which --workers 2 does.
FORK_WARNING = "ignore:This process .* is multi-threaded:DeprecationWarning"

Runner = Callable[..., tuple[int, str, str]]


def tool_runner(tmp_path_factory, capsys) -> Runner:
    """Make a function that calls ``main`` in-process and captures its output.

    Every call gets a fresh datasets cache: datasets would otherwise reuse the tokenized result
    of an earlier call (its cache key ignores num_proc), and the code under test would not run.

    Args:
        tmp_path_factory: pytest's ``tmp_path_factory`` fixture.
        capsys: pytest's ``capsys`` fixture.

    Returns:
        ``run(*args) -> (exit code, stdout, stderr)``; the arguments may be paths or numbers.
    """
    quiet_megatron_import()

    def run(*args: object) -> tuple[int, str, str]:
        cache = str(tmp_path_factory.mktemp("hf_datasets_cache"))
        code = main([*map(str, args), "--cache-dir", cache])
        out, err = capsys.readouterr()
        return code, out, err

    return run


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
