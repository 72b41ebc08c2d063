"""pretrain_mhc.py end to end on CPU: every variant trains, nproc 1 and 2 save and resume
torch_dist checkpoints, and a missing data path is a clear error."""

import subprocess
import sys

import pytest

from tests.launching import REPO_ROOT, TINY_MOE, child_env, launch, losses, step_losses

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


@pytest.mark.parametrize("variant", ["residual", "hc", "mhc", "mhc-lite"])
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
    if variant != "residual":
        assert "hyper_connection" in text or "MHCTransformerLayer" in text


@pytest.mark.parametrize(
    "nproc, layout",
    [(1, []), (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"])],
    ids=["nproc1", "nproc2-tp2-sp"],
)
def test_torch_dist_save_and_resume(nproc, layout, tmp_path):
    ckpt = tmp_path / "ckpt"
    common = [
        *TINY_MOE, *layout, "--mock-data", "--global-batch-size", "4",
        "--save", str(ckpt), "--load", str(ckpt), "--save-interval", "3",
        "--ckpt-format", "torch_dist", "--train-iters", "5",
    ]  # fmt: skip
    # The first launch stops at 3 as a pre-empted job would; the second resumes the same run.
    first = _run(nproc, [*common, "--exit-interval", "3"], tmp_path / "first.log")
    assert sorted(losses(first)) == [1, 2, 3]
    assert (ckpt / "iter_0000003" / "metadata.json").is_file()
    second = _run(nproc, common, tmp_path / "second.log")
    assert "loading distributed checkpoint from" in second and "at iteration 3" in second
    assert sorted(losses(second)) == [4, 5], second[-3000:]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "5"


def test_missing_data_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-corpus_text_document"
    args = [*TINY_MOE, "--data-path", str(missing), "--global-batch-size", "4",
            "--train-iters", "2"]  # fmt: skip
    text = _run(1, args, tmp_path / "missing.log", expect_ok=False)
    assert str(missing) in text and ".bin" in text and "Error" in text
    assert "iteration        1/" not in text


def test_checkpoints_switch_between_grouped_and_sequential_experts(tmp_path):
    """--moe-grouped-gemm (GroupedGemmMLP without TransformerEngine) keeps SequentialMLP's
    checkpoint layout: a run switches expert module and expert-parallel size at a resume, both
    ways, and continues the uninterrupted run's loss curve (float32 rounding)."""
    ep2 = ["--expert-model-parallel-size", "2"]
    common = [*TINY_MOE, "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4",
              "--ckpt-format", "torch_dist",
              "--train-iters", "4"]  # fmt: skip
    reference = losses(_run(2, [*common, *ep2], tmp_path / "reference.log"))
    first, second = tmp_path / "sequential_ep2", tmp_path / "grouped_ep1"
    # iterations 1-2: SequentialMLP with EP 2; 3: grouped, EP 1; 4: SequentialMLP, EP 2.
    steps = [
        ([*ep2, "--save", str(first), "--save-interval", "2", "--exit-interval", "2"], [1, 2]),
        (["--moe-grouped-gemm", "--load", str(first), "--save", str(second),
          "--save-interval", "3", "--exit-interval", "3"], [3]),
        ([*ep2, "--load", str(second)], [4]),
    ]  # fmt: skip
    resumed = {}
    for index, (extra, iterations) in enumerate(steps):
        logged = losses(_run(2, [*common, *extra], tmp_path / f"step{index}.log"))
        assert sorted(logged) == iterations
        resumed |= logged
    assert reference.keys() == resumed.keys() == {1, 2, 3, 4}
    for iteration, loss in reference.items():
        assert resumed[iteration] == pytest.approx(loss, rel=1e-5), (iteration, resumed, reference)


def test_tiny_example_keeps_its_log_and_trains_the_same_with_grouped_experts(tmp_path):
    """examples/tiny/train.sh keeps its output in $OUT_DIR/logs, ends with where its outputs
    are, and prints none of Megatron's known TE/Apex warnings. With --moe-grouped-gemm
    (GroupedGemmMLP) it logs the same losses as the example as it stands (SequentialMLP): same
    initial weights, float32 rounding apart."""
    import shutil

    runs = {}
    for name, extra in (("sequential", []), ("grouped", ["--moe-grouped-gemm"])):
        out_dir = tmp_path / name
        if runs:  # the corpus the first run tokenized
            shutil.copytree(tmp_path / "sequential" / "data", out_dir / "data")
        # No MASTER_PORT: train.sh picks a free port itself (its default, tested here).
        env = child_env(OUT_DIR=str(out_dir), TRAIN_ITERS="6")
        proc = subprocess.run(
            [str(REPO_ROOT / "examples" / "tiny" / "train.sh"), "--log-interval", "1",
             "--eval-iters", "0", "--save-interval", "1000", *extra],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        text = proc.stdout + proc.stderr
        assert proc.returncode == 0, text[-4000:]
        kind = "GroupedGemmMLP" if extra else "SequentialMLP"
        assert f"MoE experts: {kind}, " in text
        runs[name] = losses(text)
        (log,) = (out_dir / "logs").glob("train-*.log")
        assert log.read_text() == text  # stdout and stderr, all of it
        last = text.rstrip().splitlines()[-1]
        assert last == (
            f"> run ended: checkpoints in {out_dir / 'checkpoints'} (latest: iteration 6); "
            f"TensorBoard events in {out_dir / 'tensorboard'}; log in {log}"
        )
        assert text.count("> hidden: Megatron's known warnings") == 1
        assert "UserWarning" not in text and "Apex is not installed" not in text
    assert sorted(runs["sequential"]) == list(range(1, 7))
    assert runs["grouped"].keys() == runs["sequential"].keys()
    for iteration, loss in runs["sequential"].items():
        # Logged to 6 decimals; the expert GEMMs add in another order: float32 rounding.
        assert runs["grouped"][iteration] == pytest.approx(loss, rel=1e-5), iteration


def test_distributed_optimizer_state_follows_a_switch_of_expert_module(tmp_path):
    """With --dist-ckpt-optim-fully-reshardable (state saved by sharded keys) a SequentialMLP run
    resumes as GroupedGemmMLP and continues its loss curve; in Megatron's default format
    (dp_reshardable, flat buffers in parameter order) the switch is refused before anything
    loads, where it used to resume with the Adam state on the wrong experts."""
    common = [*TINY_MOE, "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4",
              "--ckpt-format", "torch_dist", "--use-distributed-optimizer",
              "--train-iters", "4"]  # fmt: skip
    fully = [*common, "--dist-ckpt-optim-fully-reshardable"]
    saved = tmp_path / "sequential"
    reference = losses(_run(1, [*fully, "--save", str(saved), "--save-interval", "2"],
                            tmp_path / "reference.log"))  # fmt: skip
    resumed = step_losses(_run(1, [*fully, "--moe-grouped-gemm", "--load", str(saved),
                                   "--ckpt-step", "2"], tmp_path / "grouped.log"))  # fmt: skip
    assert sorted(reference) == [1, 2, 3, 4] and sorted(resumed) == [3, 4]
    for iteration in (3, 4):  # the expert GEMMs add in another order: float32 rounding
        assert resumed[iteration] == pytest.approx(reference[iteration], rel=1e-5), iteration

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
