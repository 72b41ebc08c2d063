#!/usr/bin/env bash
# The corpus that needs no download: the Python standard library's top-level modules, tokenized
# byte-level (train with --tokenizer-type NullTokenizer --vocab-size 257).
#   tools/stdlib_corpus.sh DATA_DIR [PYTHON]
# Writes DATA_DIR/stdlib_text_document.{bin,idx} unless they exist; --data-path is
# DATA_DIR/stdlib_text_document. Used by examples/tiny and examples/stability.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_DIR="${1:?usage: $0 DATA_DIR [PYTHON]}"
PYTHON="${2:-${PYTHON:-python3}}"
PREFIX="$DATA_DIR/stdlib"
if [[ ! -f "${PREFIX}_text_document.idx" ]]; then
  STDLIB="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"
  "$PYTHON" "$ROOT/tools/preprocess_data.py" \
    --input "$STDLIB/*.py" --input-format text --tokenizer-type ByteLevel --append-eod \
    --output-prefix "$PREFIX" --workers 1 --cache-dir "$DATA_DIR/hf-cache"
fi
