"""pretrain_mhc.py end to end on CPU: every variant trains and its loss falls on real (byte)
data; a pre-empted run (``--exit-interval``) resumes from its own ``--save`` directory; the
distributed optimizer's default checkpoint format refuses a switch of expert module;
examples/tiny/train.sh keeps its log and says where its outputs are; ``--help`` documents every
mHC flag.

Elsewhere: resuming into other layouts (TP2 + SP among them) and switching between SequentialMLP
and grouped-GEMM experts at a resume, both ways, with the loss curve continued, is
tests/e2e/test_parallel_layouts.py (grouped experts computing what SequentialMLP does is also
tests/megatron/test_grouped_experts.py); a missing data path is tests/e2e/test_cpu_mode.py."""

import subprocess
import sys

import pytest

from tests.launching import REPO_ROOT, TINY_MOE, child_env, launch, losses

SCRIPT = REPO_ROOT / "pretrain_mhc.py"


@pytest.fixture(scope="module")
def byte_corpus(tmp_path_factory):
    """An indexed dataset of this repository's own Python files (byte-level, no download)."""
    work = tmp_path_factory.mktemp("corpus")
    prefix = work / "repo"
    subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "tools" / "preprocess_data.py"),
            "--input",
            str(REPO_ROOT / "mhc_megatron" / "**" / "*.py"),
            str(SCRIPT),
            "--input-format",
            "text",
            "--tokenizer-type",
            "ByteLevel",
            "--append-eod",
            "--output-prefix",
            str(prefix),
            "--cache-dir",
            str(work / "cache"),
        ],  # fmt: skip
        check=True,
        capture_output=True,
    )
    return f"{prefix}_text_document"


def _run(nproc, args, log, expect_ok=True):
    rc, text = launch(SCRIPT, nproc, args, log)
    if expect_ok and rc != 0:
        pytest.fail(f"pretrain_mhc.py (nproc {nproc}) exited with {rc}; {log}:\n{text[-6000:]}")
    return text


# mhc and residual train with the same check in tests/e2e/test_recipes.py (the tiny recipe, 20
# steps, the loss falls) and mhc on an indexed corpus in the tiny example test below.
@pytest.mark.parametrize("variant", ["hc", "mhc-lite"])
def test_each_variant_trains_and_loss_falls(variant, byte_corpus, tmp_path):
    args = [
        *TINY_MOE, "--mhc-variant", variant, "--data-path", byte_corpus, "--split", "100,0,0",
        "--global-batch-size", "4", "--train-iters", "20",
    ]  # fmt: skip
    text = _run(1, args, tmp_path / "train.log")
    curve = losses(text)
    assert sorted(curve) == list(range(1, 21)), text[-3000:]
    # Noisy single batches: compare the means of the first and last five steps.
    first = sum(curve[i] for i in range(1, 6)) / 5
    last = sum(curve[i] for i in range(16, 21)) / 5
    assert last < first - 0.3, curve
    assert "hyper_connection" in text or "MHCTransformerLayer" in text


def test_torch_dist_save_and_resume(tmp_path):
    """One rank, one directory for --save and --load: the run that Megatron's tracker resumes.
    (Resuming into TP2 + SP and other layouts: test_parallel_layouts.py.)"""
    ckpt = tmp_path / "ckpt"
    common = [
        *TINY_MOE, "--mock-data", "--global-batch-size", "4",
        "--save", str(ckpt), "--load", str(ckpt), "--save-interval", "3",
        "--ckpt-format", "torch_dist", "--train-iters", "5",
    ]  # fmt: skip
    # The first launch stops at 3 as a pre-empted job would; the second resumes the same run.
    first = _run(1, [*common, "--exit-interval", "3"], tmp_path / "first.log")
    assert sorted(losses(first)) == [1, 2, 3]
    assert (ckpt / "iter_0000003" / "metadata.json").is_file()
    second = _run(1, common, tmp_path / "second.log")
    assert "loading distributed checkpoint from" in second and "at iteration 3" in second
    assert sorted(losses(second)) == [4, 5], second[-3000:]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "5"


def test_tiny_example_keeps_its_log_and_says_where_its_outputs_are(tmp_path):
    """examples/tiny/train.sh (as it stands: SequentialMLP experts) trains, keeps its output in
    $OUT_DIR/logs, ends with where its outputs are, and prints none of Megatron's known TE/Apex
    warnings. (Grouped-GEMM experts train the same: test_parallel_layouts.py and
    tests/megatron/test_grouped_experts.py.)"""
    out_dir = tmp_path / "run"
    # No MASTER_PORT: train.sh picks a free port itself (its default, tested here).
    env = child_env(OUT_DIR=str(out_dir), TRAIN_ITERS="6")
    proc = subprocess.run(
        [str(REPO_ROOT / "examples" / "tiny" / "train.sh"), "--log-interval", "1",
         "--eval-iters", "0", "--save-interval", "1000"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "MoE experts: SequentialMLP, " in text
    assert sorted(losses(text)) == list(range(1, 7))
    (log,) = (out_dir / "logs").glob("train-*.log")
    assert log.read_text() == text  # stdout and stderr, all of it
    last = text.rstrip().splitlines()[-1]
    assert last == (
        f"> run ended: checkpoints in {out_dir / 'checkpoints'} (latest: iteration 6); "
        f"TensorBoard events in {out_dir / 'tensorboard'}; log in {log}"
    )
    assert text.count("> hidden: Megatron's known warnings") == 1
    assert "UserWarning" not in text and "Apex is not installed" not in text


def test_default_distributed_optimizer_format_refuses_a_switch_of_expert_module(tmp_path):
    """In Megatron's default format (dp_reshardable, flat buffers in parameter order) a
    SequentialMLP run resumed as GroupedGemmMLP is refused before anything loads, where it used
    to resume with the Adam state on the wrong experts. (With
    --dist-ckpt-optim-fully-reshardable, state saved by sharded keys, the switch resumes and
    continues the loss curve: test_parallel_layouts.py.)"""
    common = [*TINY_MOE, "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4",
              "--ckpt-format", "torch_dist", "--use-distributed-optimizer",
              "--train-iters", "4"]  # fmt: skip
    default_format = tmp_path / "dp_reshardable"
    _run(1, [*common, "--save", str(default_format), "--save-interval", "1", "--exit-interval",
             "1"], tmp_path / "default.log")  # fmt: skip
    text = _run(1, [*common, "--moe-grouped-gemm", "--load", str(default_format)],
                tmp_path / "refused.log", expect_ok=False)  # fmt: skip
    assert "dp_reshardable" in text and "drop --moe-grouped-gemm" in text, text[-3000:]
    assert "iteration        2/" not in text


def test_help_lists_every_mhc_flag_with_its_help():
    """``pretrain_mhc.py --help`` used to crash on a bare ``%`` in Megatron 0.19.2's own help
    text; now it prints, and every ``--mhc-*`` flag has a help text."""
    import re

    from mhc_megatron.megatron.config import mhc_fields

    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "10%)" in text  # the help that used to break, printed as written
    flags = [f"--{f.name.replace('_', '-')}" for f in mhc_fields()]
    assert len(flags) >= 8
    for flag in flags:
        # "  --flag METAVAR   help..." then indented continuation lines, up to the next option.
        entry = re.search(rf"^  {re.escape(flag)}\b(.*?)(?=^  -)", text, flags=re.M | re.S)
        assert entry, flag
        words = re.sub(r"^\S+|\{[^}]*\}|[A-Z_]{3,}", "", entry.group(1).strip())
        assert len(words.split()) >= 3, (flag, entry.group(1))
