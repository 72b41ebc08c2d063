"""Tokenizers of tools/preprocess_data.py (mhc_megatron.data.tokenizers).

ByteLevel, Hugging Face, GPT-2 BPE and SentencePiece: the ids are compared with megatron-core's
own GPT2BPETokenizer and SentencePieceTokenizer, and every tokenizer mistake on the command line
is refused with a message that says what to change. CPU only; ``main`` runs in-process, the tiny
tokenizers are trained once per module (no download).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.tools.data_helpers import (
    DOCS_A,
    FORK_WARNING,
    files_in,
    load_indexed,
    read_docs,
    write_jsonl,
)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> dict[str, Path]:
    """Hugging Face tokenizer directories (save_pretrained): a WordLevel tokenizer over a
    handful of words, with ``<eos>`` as eos_token (``"eos"``) and without one (``"no_eos"``)."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed")
    words = ["[UNK]", "<eos>", "hello", "world", "the", "quick", "fox", ",", "!"]
    out = {}
    for name, kwargs in (("eos", {"eos_token": "<eos>"}), ("no_eos", {})):
        model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
        backend = tokenizers.Tokenizer(model)
        backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        hf = transformers.PreTrainedTokenizerFast(
            tokenizer_object=backend, unk_token="[UNK]", **kwargs
        )
        out[name] = tmp_path_factory.mktemp(f"hf_{name}")
        hf.save_pretrained(str(out[name]))
    return out


@pytest.mark.filterwarnings(FORK_WARNING)
def test_hf_tokenizer_round_trip(tmp_path, run_tool, tiny_hf):
    docs = ["hello world !", "the quick fox , hello", "unknown words here"]
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    prefix = tmp_path / "out" / "hf"
    code, out, err = run_tool(
        "--input", src, "--output-prefix", prefix, "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", tiny_hf["eos"], "--append-eod", "--workers", "2",
    )  # fmt: skip
    assert code == 0, err
    assert read_docs(f"{prefix}_text_document") == [
        [2, 3, 8, 1],
        [4, 5, 6, 7, 2, 1],
        [0, 0, 0, 1],
    ]
    assert "HuggingFaceTokenizer" in out


def test_hf_tokenizer_without_eos_needs_eod_id(tmp_path, run_tool, tiny_hf):
    tok_dir = tiny_hf["no_eos"]
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


def megatron_tokenizer(monkeypatch: pytest.MonkeyPatch, *flags: str | Path):
    """Build the tokenizer that Megatron training builds from these tokenizer flags.

    The flags go through megatron-core's own argument parser (so every other tokenizer option
    has its training default) and ``build_tokenizer``, as ``pretrain_mhc.py`` does.
    """
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training.arguments import parse_args

    monkeypatch.setattr(sys, "argv", ["pretrain_mhc.py", *map(str, flags)])
    return build_tokenizer(parse_args(ignore_unknown_args=True))


def megatron_gpt2_tokenizer(
    monkeypatch: pytest.MonkeyPatch, config_dir: Path, vocab: Path, merges: Path
):
    """megatron-core 0.19.2's GPT2BPETokenizer for these files, built without the network.

    megatron-core builds it with ``AutoTokenizer.from_pretrained("gpt2", vocab_file=...,
    merges_file=...)``, which fetches the Hugging Face Hub's ``gpt2`` configuration. Here "gpt2"
    is replaced by a local directory with what that configuration says (model type gpt2, 1024
    positions); the rest of megatron-core's and transformers' code runs as in training. The
    Hub repository also holds GPT-2's own ``tokenizer.json``, which transformers 5 would load
    instead of the files given; it is left out so that the files given are the ones used.
    """
    from megatron.core.tokenizers.text.libraries import megatron_hf_tokenizer

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


@pytest.fixture(scope="module", params=["eod", "no_eod"])
def gpt2_case(request, tiny_bpe, tmp_path_factory):
    """(vocab kind, vocab.json, merges.txt, megatron-core's GPT2BPETokenizer for them)."""
    vocab, merges = tiny_bpe[request.param]
    with pytest.MonkeyPatch.context() as monkeypatch:
        config_dir = tmp_path_factory.mktemp("gpt2_config")
        megatron = megatron_gpt2_tokenizer(monkeypatch, config_dir, vocab, merges)
    return request.param, vocab, merges, megatron


@pytest.fixture(scope="module")
def megatron_sp(tiny_sp):
    """megatron-core's SentencePieceTokenizer for the model with an eos piece."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return megatron_tokenizer(
            monkeypatch, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
            tiny_sp["eod"],
        )  # fmt: skip


@pytest.mark.filterwarnings(FORK_WARNING)
def test_gpt2_bpe_matches_megatron(tmp_path, run_tool, gpt2_case):
    """The ids are those of megatron-core's GPT2BPETokenizer, <|endoftext|> appended."""
    vocab_kind, vocab, merges, megatron = gpt2_case
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


@pytest.mark.filterwarnings(FORK_WARNING)
@pytest.mark.parametrize("append_eod", [True, False])
def test_sentencepiece_matches_megatron(tmp_path, run_tool, tiny_sp, megatron_sp, append_eod):
    """The ids are those of megatron-core's SentencePieceTokenizer: no BOS/EOS, eos_id appended."""
    import sentencepiece as spm

    model = tiny_sp["eod"]
    megatron = megatron_sp
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


# --------------------------------------------------------------------------------------------
# Mistakes: refused before the input is read
# --------------------------------------------------------------------------------------------


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
        "byte_level_tokenizer_model": (
            ["--tokenizer-type", "ByteLevel", "--tokenizer-model", str(directory)],
            ["--tokenizer-model is not used by --tokenizer-type ByteLevel", "drop it"],
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
    "sp_other_eod", "sp_eod_outside", "sp_no_eos", "byte_level_tokenizer_model",
    "byte_level_merge_file", "hf_vocab_file", "hf_given_sp_model",
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
        ("transformers", ["HuggingFaceTokenizer", "--tokenizer-model", "tokenizer_dir"]),
        ("tokenizers", ["GPT2BPETokenizer", "--vocab-file", "v.json", "--merge-file", "m.txt"]),
        ("sentencepiece", ["SentencePieceTokenizer", "--tokenizer-model", "x.model"]),
    ],
)
def test_tokenizers_need_their_package(tmp_path, run_tool, monkeypatch, module, arguments):
    good = write_jsonl(tmp_path / "good.jsonl", DOCS_A)
    monkeypatch.setitem(sys.modules, module, None)  # makes `import <module>` fail
    code, _, err = run_tool(
        "--input", good, "--output-prefix", tmp_path / "out" / "x", "--tokenizer-type", *arguments
    )
    assert code == 1 and f"pip install {module}" in err
