r"""Tokenize a text corpus into Megatron's indexed dataset format (``.bin`` / ``.idx``).

Usage:
    python tools/preprocess_data.py --input 'data/*.jsonl' --output-prefix data/corpus \
        --tokenizer-type ByteLevel --append-eod --workers 8

Writes ``<output-prefix>_<key>_document.bin/.idx`` per ``--json-keys`` entry. The code lives in
the ``mhc_megatron.data`` package; ``--help`` lists the flags and ``mhc_megatron/data/cli.py``
documents formats, tokenizers and error handling.
"""

import sys

from mhc_megatron.data.cli import main
from mhc_megatron.processes import skip_final_collection

if __name__ == "__main__":
    exit_code = main()
    skip_final_collection()  # the exit's last collection (bench_startup.py)
    sys.exit(exit_code)
