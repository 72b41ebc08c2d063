"""Corpus preprocessing: text files tokenized into Megatron's indexed dataset (``.bin``/``.idx``).

Modules:
    * ``readers``: finds, loads and checks the input files (JSON Lines, text, Parquet).
    * ``tokenizers``: the tokenizers (ByteLevel, Hugging Face, GPT-2 BPE, SentencePiece).
    * ``tokenizer_files``: checks of the tokenizer files named on the command line.
    * ``encoding``: tokenizes the loaded corpus in parallel (``Dataset.map``).
    * ``writer``: writes the token ids with megatron-core's ``IndexedDatasetBuilder``.
    * ``progress``: progress bars shared by the stages.
    * ``errors``: the user-facing errors.
    * ``cli``: the command line of ``tools/preprocess_data.py``.
"""
