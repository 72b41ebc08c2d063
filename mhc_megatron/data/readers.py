"""Input files: finding them, loading them with Hugging Face ``datasets``, checking their text.

Formats: JSON Lines / JSON, plain text (one document per file) and Parquet, each optionally
compressed (``.gz``, ``.bz2``, ...). Every file is checked as it is loaded, so a bad file is
reported by name (and line or record) before anything is tokenized.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from mhc_megatron.data.errors import BadInputFile, PreprocessError
from mhc_megatron.data.progress import datasets_progress_bars, progress_bar

FORMATS = ("json", "text", "parquet")
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip")
EXTENSION_FORMATS = {
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".txt": "text",
    ".text": "text",
    ".parquet": "parquet",
}
GLOB_CHARS = ("*", "?", "[")


def format_from_path(path: str) -> str | None:
    """Guess the input format from a file name.

    Args:
        path: The file path, possibly with a compression suffix such as ``.gz``.

    Returns:
        ``json``, ``text``, ``parquet`` or None when the extension is not recognised.
    """
    name = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return EXTENSION_FORMATS.get(os.path.splitext(name)[1])


def expand_inputs(patterns: list[str]) -> list[str]:
    """Expand ``--input`` paths and globs into an ordered list of files.

    Paths keep the order given on the command line; the matches of a glob are sorted.

    Args:
        patterns: File paths and/or glob patterns.

    Returns:
        The input files.

    Raises:
        PreprocessError: If a path does not exist, is a directory, or a glob matches no file.
    """
    files: list[str] = []
    for pattern in patterns:
        if any(c in pattern for c in GLOB_CHARS) and not os.path.exists(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise PreprocessError(
                    f"input glob {pattern!r} matches no file; check the path and quote the glob "
                    "so the shell does not expand it"
                )
            files.extend(matches)
        elif os.path.isdir(pattern):
            raise PreprocessError(
                f"input {pattern!r} is a directory; pass files or a glob such as "
                f"'{os.path.join(pattern, '*.jsonl')}'"
            )
        elif not os.path.isfile(pattern):
            raise PreprocessError(f"input file not found: {pattern!r}; check --input")
        else:
            files.append(pattern)
    return files


def _locate_json_error(path: str) -> str:
    """Find the first line of a JSON Lines file that is not UTF-8 or not a JSON object.

    Only used to improve an error message, so it gives up quietly on what it cannot tell: a
    compression fsspec does not know, or a ``.json`` file whose first line does not parse (it
    may be one multi-line JSON document).

    Args:
        path: The JSON Lines file, possibly compressed.

    Returns:
        A description such as ``" (line 3: Expecting value: 'not json')"`` or an empty string.
    """
    import fsspec
    from fsspec.utils import infer_compression

    compression = infer_compression(path)
    if compression is None and path.lower().endswith(COMPRESSION_SUFFIXES):
        return ""  # e.g. .zst without the zstandard package: the raw bytes would look corrupt
    name = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    one_document = name.endswith(".json")
    lineno = 0
    try:
        # Binary lines decoded one by one: a text-mode reader decodes whole chunks, so its
        # UnicodeDecodeError would not tell the line.
        with fsspec.open(path, "rb", compression=compression) as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    return f" (line {lineno}, byte {exc.start + 1}: {exc.reason})"
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    if one_document and lineno == 1:
                        return ""
                    return f" (line {lineno}: {exc.msg}: {line.strip()[:80]!r})"
                if not isinstance(record, dict):
                    return f" (line {lineno}: not a JSON object: {line.strip()[:80]!r})"
    except EOFError:
        return f" (the data stops after line {lineno}: the file is truncated)"
    except Exception:  # only a hint: the caller reports the real error
        return ""
    return ""


def load_file(path: str, fmt: str, keys: list[str], cache_dir: str | None) -> tuple[Any, int]:
    """Load one input file with Hugging Face ``datasets`` and check its text columns.

    Args:
        path: The input file.
        fmt: ``json``, ``text`` or ``parquet``.
        keys: The columns holding the text.
        cache_dir: The ``datasets`` cache directory, or None for the default.

    Returns:
        A ``datasets.Dataset`` holding only the ``keys`` columns, and the number of UTF-8 bytes
        of text in them.

    Raises:
        BadInputFile: If the file cannot be read, is not UTF-8, holds no records, lacks a key, a
            key holds something other than strings, or a key is empty in every record.
    """
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    if os.path.getsize(path) == 0:
        raise BadInputFile(path, "is empty (0 bytes)")
    kwargs: dict[str, Any] = {"sample_by": "document"} if fmt == "text" else {}
    try:
        ds = datasets.load_dataset(
            fmt, data_files=[os.path.abspath(path)], split="train", cache_dir=cache_dir, **kwargs
        )
    except Exception as exc:  # datasets wraps the real cause in DatasetGenerationError
        if "corresponds to no data" in str(exc):  # e.g. a JSON Lines file of blank lines
            raise BadInputFile(path, "contains no documents") from exc
        cause = exc.__cause__ or exc
        detail = _locate_json_error(path) if fmt == "json" else ""
        expected = {
            "json": "one JSON object per line",
            "parquet": "a Parquet file",
            "text": "UTF-8 text",
        }[fmt]
        raise BadInputFile(
            path,
            f"could not be read as {fmt}{detail}: {type(cause).__name__}: {cause} (expected "
            f"{expected}; if that is wrong, set --input-format)",
        ) from exc
    if len(ds) == 0:
        raise BadInputFile(path, "contains no documents")
    missing = [k for k in keys if k not in ds.column_names]
    if missing:
        raise BadInputFile(
            path,
            f"has no field {missing[0]!r} (fields found: {', '.join(ds.column_names) or 'none'}); "
            "set --json-keys to the field holding the text",
        )
    text_bytes = 0
    for key in keys:
        feature = ds.features[key]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise BadInputFile(
                path,
                f"holds {feature} values in field {key!r}, not text; set --json-keys to a field "
                "holding strings",
            )
        column = ds.data.column(key)
        if column.null_count:
            first = pc.index(pc.is_null(column), True).as_py()
            raise BadInputFile(
                path,
                f"has no {key!r} field (or it is null) in record {first + 1} "
                f"({column.null_count} record(s) affected); fix the file or drop those records",
            )
        # pyarrow's JSON and Parquet readers accept invalid UTF-8 in strings; it would only fail
        # later, inside a tokenizer worker. A full validation checks every string's bytes.
        offset = 0
        for chunk in column.chunks:
            try:
                chunk.validate(full=True)
            except pa.ArrowInvalid as exc:
                where = _locate_json_error(path) if fmt == "json" else ""
                # Arrow counts the string index from the start of the chunk.
                where = where or f" (records {offset + 1}..{offset + len(chunk)}: {exc})"
                raise BadInputFile(
                    path,
                    f"is not valid UTF-8 text in field {key!r}{where}; re-encode it as UTF-8",
                ) from exc
            offset += len(chunk)
        if not pc.any(pc.not_equal(pc.utf8_trim_whitespace(column), "")).as_py():
            raise BadInputFile(
                path,
                f"has no text: field {key!r} is empty or whitespace in all {len(ds)} record(s)",
            )
        text_bytes += pc.sum(pc.binary_length(column)).as_py()
    return ds.select_columns(keys), text_bytes


@dataclass
class Corpus:
    """The loaded input files.

    Attributes:
        dataset: A ``datasets.Dataset`` with the ``--json-keys`` columns, one row per document.
        files: The input files loaded, in order.
        skipped: The bad input files left out (``--skip-bad-files``), in order.
        text_bytes: UTF-8 bytes of text in the ``--json-keys`` columns.
    """

    dataset: Any
    files: list[str]
    skipped: list[BadInputFile]
    text_bytes: int


def load_inputs(
    files: list[str],
    input_format: str | None,
    keys: list[str],
    cache_dir: str | None,
    skip_bad_files: bool = False,
    progress: bool = True,
) -> Corpus:
    """Load, check and concatenate all input files, in order.

    Every file is loaded even after a bad one, so a refused run names all bad files at once.

    Args:
        files: The input files.
        input_format: The ``--input-format`` value, or None to use each file's extension.
        keys: The columns holding the text.
        cache_dir: The ``datasets`` cache directory, or None for the default.
        skip_bad_files: Leave bad files out with a warning instead of refusing to go on.
        progress: Show a progress bar.

    Returns:
        The loaded corpus.

    Raises:
        PreprocessError: On an argument mistake (format not known, plain text with other keys),
            on any bad file unless ``skip_bad_files``, or when no file is usable.
    """
    import datasets

    # Argument mistakes first, before spending time on loading.
    formats = []
    for path in files:
        fmt = input_format or format_from_path(path)
        if fmt is None:
            raise PreprocessError(
                f"cannot tell the format of input file {path!r} from its extension; pass "
                f"--input-format {{{','.join(FORMATS)}}}"
            )
        if fmt == "text" and keys != ["text"]:
            raise PreprocessError(
                f"input file {path!r} is plain text, whose only field is 'text'; use "
                "--json-keys text (the default)"
            )
        formats.append(fmt)

    # Only local files are read, yet load_dataset sends a download-count request to the Hugging
    # Face Hub for every file: up to its 3 s timeout each where the network is slow or blocked
    # (0.13 s each measured here, 35 s for 200 small files).
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    parts, loaded, bad, text_bytes = [], [], [], 0
    sizes = [os.path.getsize(path) for path in files]
    # One bar over the bytes of all files. datasets' own bar ("Generating train split") shows
    # the progress inside a file, which is worth it only when there is one file: with many it
    # would print a bar per file.
    with (
        progress_bar(progress, total=sum(sizes), desc="Loading", unit="B", unit_scale=True) as bar,
        datasets_progress_bars(progress and len(files) == 1),
    ):
        for path, fmt, size in zip(files, formats, sizes, strict=True):
            try:
                ds, nbytes = load_file(path, fmt, keys, cache_dir)
            except BadInputFile as exc:
                bad.append(exc)
                level, action = ("warning", "; skipping it") if skip_bad_files else ("error", "")
                bar.write(f"{level}: {exc}{action}", file=sys.stderr)
            else:
                parts.append(ds)
                loaded.append(path)
                text_bytes += nbytes
            bar.update(size)

    if bad and not skip_bad_files:
        names = ", ".join(repr(b.path) for b in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise PreprocessError(
            f"{len(bad)} of {len(files)} input file(s) cannot be used ({names}{more}; the "
            "reasons are above), so nothing was written. Fix or remove them, or pass "
            "--skip-bad-files to leave them out"
        )
    if not parts:
        raise PreprocessError(
            f"all {len(files)} input file(s) are bad (the reasons are above); nothing to write"
        )
    if len(parts) == 1:
        dataset = parts[0]
    else:
        if any(p.features != parts[0].features for p in parts[1:]):
            target = datasets.Features({k: datasets.Value("large_string") for k in keys})
            parts = [p.cast(target) for p in parts]
        dataset = datasets.concatenate_datasets(parts)
    return Corpus(dataset, loaded, bad, text_bytes)
