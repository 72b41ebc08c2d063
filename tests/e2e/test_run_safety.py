"""Resume and run safety, end to end (issue 12): a checkpoint never loads into a different model,
no non-finite step is applied or saved, and bad input exits non-zero before training with a
message that says what to change. Checks of the same functions without a launch are in
tests/training/test_run_checks.py.

Bad input: three cases, one per way a refusal reaches the user (a checkpoint check and a data
check in ``run_checks.check_run``, an mHC setting refused by ``MHCTransformerConfig`` after it),
are launched and must exit 1 with ``error: <message>`` before the first step. The other seven
fail in the same ``check_run`` before Megatron starts, so they run in this process: the same
flags through Megatron's parser, then what ``pretrain_mhc.py`` calls before ``pretrain()``, and
the same message. (A launch costs about 5 s of start-up and exit each.)"""

import re
import shutil
import subprocess
import sys

import pytest
import torch

from mhc_megatron.processes import kill_tree
from tests.launching import REPO_ROOT, TINY_MOE, launch, losses, step_losses

SCRIPT = REPO_ROOT / "pretrain_mhc.py"
RUN_FLAGS = [  # the tiny model, resumable every 3 steps
    *TINY_MOE, "--global-batch-size", "4", "--ckpt-format", "torch_dist", "--save-interval", "3",
]  # fmt: skip
FIRST_STEP = "iteration        1/"


def _run(args, log, nproc=1, expect_rc=0):
    rc, text = launch(SCRIPT, nproc, args, log)
    if rc != expect_rc:
        pytest.fail(f"pretrain_mhc.py exited {rc}, expected {expect_rc}; {log}:\n{text[-5000:]}")
    return text


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 6-step run on mock data, checkpoints at 3 and 6: ``(dir, losses)``."""
    work = tmp_path_factory.mktemp("reference")
    ckpt = work / "ckpt"
    args = [*RUN_FLAGS, "--mock-data", "--train-iters", "6", "--save", str(ckpt), "--load",
            str(ckpt)]  # fmt: skip
    text = _run(args, work / "run.log")
    curve = step_losses(text)
    assert sorted(curve) == list(range(1, 7))
    # The run held the --save lock (the file keeps its holder's line after the lock goes).
    assert "pid" in (ckpt / "mhc_run.lock").read_text()
    return ckpt, curve


def _resume_args(ckpt, save, *extra):
    return [*RUN_FLAGS, "--mock-data", "--train-iters", "6", "--load", str(ckpt),
            "--ckpt-step", "3", "--save", str(save), *extra]  # fmt: skip


def test_tp_change_keeps_the_padded_vocabulary_and_continues_the_curve(reference, tmp_path):
    # Before: TP 2 padded the vocabulary to 512 rows, the 384-row checkpoint loaded without a
    # word and the first resumed loss was ~6% off. The resume also switches the experts from
    # SequentialMLP to GroupedGemmMLP with Megatron's plain Adam (no distributed optimizer): its
    # state follows the experts by key (test_parallel_layouts covers the distributed optimizer).
    ckpt, expected = reference
    layout = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--moe-grouped-gemm"]
    text = _run(_resume_args(ckpt, tmp_path / "tp2", *layout), tmp_path / "tp2.log", nproc=2)
    assert "padded vocabulary: 384 rows from the checkpoint" in text
    assert "MoE experts: GroupedGemmMLP, " in text
    resumed = step_losses(text)
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        # TP 2 sums the attention/MLP partial products in another order: fp32 rounding only.
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5), (step, resumed, expected)


def test_same_layout_resume_is_exact(reference, tmp_path):
    ckpt, expected = reference
    resumed = step_losses(_run(_resume_args(ckpt, tmp_path / "same"), tmp_path / "same.log"))
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        # Bit-exact training; step_losses undoes Megatron's averaged second line from printed
        # values (7 digits), which costs up to 2 units of the last digit.
        assert resumed[step] == pytest.approx(expected[step], rel=0, abs=3e-6), step


@pytest.mark.parametrize(
    "change, listed",
    [
        (["--mhc-variant", "hc"], ["mhc_variant: checkpoint 'mhc', this run 'hc'",
                                   "pass --mhc-variant mhc"]),
        (["--mhc-variant", "residual", "--hidden-size", "32"],
         ["mhc_variant: checkpoint 'mhc', this run 'residual'", "hidden_size: checkpoint 64",
          "pass --hidden-size 64"]),
    ],
    ids=["hc-on-mhc", "residual-narrower"],
)  # fmt: skip
def test_a_different_model_is_refused_before_training(reference, tmp_path, change, listed):
    # Before: hc loaded and trained a dead model (grad norm 0, exit 0); residual failed with a
    # KeyError listing hundreds of keys.
    ckpt, _ = reference
    text = _run(_resume_args(ckpt, tmp_path / "other", *change), tmp_path / "x.log", expect_rc=1)
    for line in listed:
        assert line in text
    assert "--allow-checkpoint-model-change" in text and FIRST_STEP not in text
    assert not (tmp_path / "other").exists() or not any((tmp_path / "other").glob("iter_*"))


def _tensors(checkpoint_dir, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp_path / f"{checkpoint_dir.name}.pt"
    dcp_to_torch_save(str(checkpoint_dir), str(target))
    state = torch.load(target, weights_only=False)
    return {k: v for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}


def test_nonfinite_steps_are_skipped_named_and_never_saved(tmp_path):
    # lr 1e30 makes the first update finite but huge; every later forward overflows. Before: the
    # NaN step was applied ("skipped iterations: 0"), the NaN model saved, every resume failed.
    ckpt = tmp_path / "ckpt"
    args = [*RUN_FLAGS, "--mock-data", "--train-iters", "8", "--lr", "1e30", "--weight-decay",
            "0", "--save", str(ckpt), "--save-interval", "1", "--max-nonfinite-steps-in-a-row",
            "2"]  # fmt: skip
    text = _run(args, tmp_path / "nan.log", expect_rc=1)
    assert "warning: iteration 2: non-finite step, not applied (1 in a row)" in text
    assert "number of skipped iterations:   1" in text
    assert "first site with non-finite coefficients L001.attention" in text
    assert "first parameter with a non-finite gradient" in text
    assert "error: iteration 3: non-finite step" in text and "Stopping (2 non-finite" in text
    saved = sorted(p.name for p in ckpt.glob("iter_*"))
    assert saved == ["iter_0000001", "iter_0000002"], saved
    for name in saved:
        for key, value in _tensors(ckpt / name, tmp_path).items():
            assert torch.isfinite(value).all(), (name, key)
    # --nonfinite-step stop: the first one ends the run.
    stop = _run([*args[:-2], "--nonfinite-step", "stop", "--save", str(tmp_path / "stop")],
                tmp_path / "stop.log", expect_rc=1)  # fmt: skip
    assert "error: iteration 2: non-finite step" in stop and "--nonfinite-step stop" in stop


def test_a_large_init_trains_with_finite_gradients(tmp_path):
    # Before: --init-method-std 1e4 gave mHC a NaN grad norm at step 1 (the Sinkhorn backward
    # overflowed on underflowed columns) while the residual model stayed finite.
    args = [*RUN_FLAGS, "--mock-data", "--train-iters", "3", "--init-method-std", "1e4",
            "--mhc-backend", "torch"]  # fmt: skip
    text = _run(args, tmp_path / "init.log")
    norms = [float(v) for v in re.findall(r"grad norm: ([0-9.eE+-]+|nan|inf)", text)]
    assert len(norms) == 3 and all(torch.isfinite(torch.tensor(norms))), norms
    assert "non-finite step" not in text


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Indexed byte-level datasets: ``three`` (3 documents) and ``bytes`` (this repo's ops)."""
    work = tmp_path_factory.mktemp("corpora")
    docs = work / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"d{i}.txt").write_text(f"document {i} " * 50)
    prefixes = {}
    ops_sources = str(REPO_ROOT / "mhc_megatron" / "ops" / "*.py")
    for name, inputs in (("three", [str(docs / "*.txt")]), ("bytes", [ops_sources])):
        subprocess.run(
            [sys.executable, str(REPO_ROOT / "tools" / "preprocess_data.py"), "--input", *inputs,
             "--input-format", "text", "--tokenizer-type", "ByteLevel", "--append-eod",
             "--output-prefix", str(work / name), "--cache-dir", str(work / "cache")],
            check=True, capture_output=True,
        )  # fmt: skip
        prefixes[name] = str(work / f"{name}_text_document")
    return prefixes


def _bad_input(case, reference, corpora, tmp_path):
    """``(extra args, expected substrings)`` for one bad input."""
    ckpt, _ = reference
    if case in ("garbled-tracker", "empty-tracker"):
        copy = tmp_path / "copy"
        shutil.copytree(ckpt, copy)
        (copy / "latest_checkpointed_iteration.txt").write_text(
            "" if case == "empty-tracker" else "iter six\n"
        )
        return ["--mock-data", "--load", str(copy), "--save", str(copy)], [
            "latest_checkpointed_iteration.txt holds",
            "--ckpt-step N",
            "here: 3, 6",
        ]
    if case == "load-is-a-file":
        target = tmp_path / "file"
        target.write_text("not a checkpoint")
        return ["--mock-data", "--load", str(target), "--save", str(tmp_path / "s")], [
            "is a file, not a checkpoint directory"
        ]
    if case == "load-is-another-empty-dir":
        (tmp_path / "empty").mkdir()
        return ["--mock-data", "--load", str(tmp_path / "empty"), "--save", str(tmp_path / "s")], [
            "is empty and is not the --save directory"
        ]
    if case == "damaged-shard":
        copy = tmp_path / "copy"
        shutil.copytree(ckpt, copy)
        shard = next((copy / "iter_0000006").glob("*.distcp"))
        shard.write_bytes(torch.randint(0, 256, (shard.stat().st_size,),
                                        dtype=torch.uint8).numpy().tobytes())  # fmt: skip
        return ["--mock-data", "--load", str(copy), "--save", str(copy)], [
            "iter_0000006 is damaged",
            "--ckpt-step 3",
        ]
    if case == "truncated-shard":
        copy = tmp_path / "copy"
        shutil.copytree(ckpt, copy)
        shard = next((copy / "iter_0000006").glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:1000])
        return ["--mock-data", "--load", str(copy), "--save", str(copy)], [
            f"{shard} has 1000 bytes",
            "--ckpt-step 3",
        ]
    if case == "split-without-documents":
        return ["--data-path", corpora["three"], "--split", "98,2,0"], [
            "gives the valid split 0 of 3 documents",
            "--split 98,2,0",
        ]
    if case == "truncated-bin":
        prefix = str(tmp_path / "cut")
        shutil.copy(corpora["bytes"] + ".idx", prefix + ".idx")
        data = open(corpora["bytes"] + ".bin", "rb").read()
        open(prefix + ".bin", "wb").write(data[: len(data) // 2])
        return ["--data-path", prefix, "--split", "100,0,0"], [f"{prefix}.bin has", "truncated"]
    if case == "token-ids-above-vocab":
        return ["--data-path", corpora["bytes"], "--split", "100,0,0", "--vocab-size", "100"], [
            f"{corpora['bytes']}.bin holds token id",
            "another tokenizer",
        ]
    if case == "too-many-streams":
        return ["--mock-data", "--mhc-num-streams", "100"], ["from 1 to 16"]
    raise AssertionError(case)


def _bad_input_args(case, reference, corpora, tmp_path):
    """``(pretrain_mhc.py arguments, expected substrings)`` for one bad input."""
    extra, expected = _bad_input(case, reference, corpora, tmp_path)
    args = [*RUN_FLAGS, "--train-iters", "6", *extra]
    if "--save" not in extra:
        args += ["--save", str(tmp_path / "run")]
    return args, expected


# One case per way a refusal reaches the user: a checkpoint check and a data check (both
# RunCheckError from run_checks.check_run), and an invalid mHC setting (MHCConfigError from
# MHCTransformerConfig, built after check_run).
LAUNCHED_BAD_INPUT = ["garbled-tracker", "split-without-documents", "too-many-streams"]
# Refused by run_checks.check_run as well, before any process group or Megatron global state:
# checked in this process (test_bad_input_is_refused_by_the_run_checks).
IN_PROCESS_BAD_INPUT = [
    "empty-tracker", "load-is-a-file", "load-is-another-empty-dir", "damaged-shard",
    "truncated-shard", "truncated-bin", "token-ids-above-vocab",
]  # fmt: skip


@pytest.mark.parametrize("case", LAUNCHED_BAD_INPUT)
def test_bad_input_exits_nonzero_with_a_fix(case, reference, corpora, tmp_path):
    # Before: exit 0 without training (tracker), training from scratch (--load), a hang (split),
    # late errors naming no file (data, shards), or a 1B-parameter model (n = 100).
    args, expected = _bad_input_args(case, reference, corpora, tmp_path)
    text = _run(args, tmp_path / "bad.log", expect_rc=1)
    assert "error: " in text, text[-3000:]
    for fragment in expected:
        assert fragment in text, (fragment, text[-3000:])
    assert FIRST_STEP not in text


def _run_checks_refusal(args, monkeypatch) -> str:
    """The message of the RunCheckError that ``pretrain_mhc.py args`` raises before Megatron
    starts, found in this process.

    As ``pretrain_mhc.train()``: the CPU flags ``--cpu`` adds, Megatron's parser with the mHC
    flags, the data-path check, then ``run_checks.check_run`` with the tokenizer's vocabulary
    size. Megatron's validation (and the global state it sets up) is left out: of the settings
    these checks read it only fills in a missing --split, and every data case gives one.
    ``pretrain_mhc.main()`` prints the message after ``error: `` and exits 1, which the launched
    cases show.
    """
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training.arguments import parse_args

    from mhc_megatron.training import gpt_step, run_checks
    from mhc_megatron.training.arguments import add_mhc_args
    from mhc_megatron.training.cpu_settings import with_cpu_flags

    assert "--cpu" in args
    monkeypatch.setattr(sys, "argv", with_cpu_flags([str(SCRIPT), *args]))
    parsed = parse_args(extra_args_provider=add_mhc_args)
    gpt_step.check_data_paths(parsed)
    # Should a check pass after all, this process must not take the run lock on --save.
    monkeypatch.setattr(run_checks, "_RUN_LOCK", object())
    with pytest.raises(run_checks.RunCheckError) as refused:
        run_checks.check_run(parsed, build_tokenizer(parsed).vocab_size)
    return str(refused.value)


@pytest.mark.parametrize("case", IN_PROCESS_BAD_INPUT)
def test_bad_input_is_refused_by_the_run_checks(case, reference, corpora, tmp_path, monkeypatch):
    # Before: as test_bad_input_exits_nonzero_with_a_fix.
    if case == "damaged-shard":
        # Its message is the one for any failure to read a checkpoint's common state: this
        # process must read the intact one.
        from mhc_megatron.training import run_checks

        ckpt, _ = reference
        info = run_checks.inspect_load_dir(str(ckpt), None, 6)
        run_checks.verify_shards(info)
        assert run_checks.read_checkpoint_args(info).mhc_variant == "mhc"
    args, expected = _bad_input_args(case, reference, corpora, tmp_path)
    message = _run_checks_refusal(args, monkeypatch)
    for fragment in expected:
        assert fragment in message, (fragment, message)


def test_resuming_with_more_iterations_says_which_flag_extends_a_run(reference, tmp_path):
    ckpt, _ = reference
    args = [*RUN_FLAGS, "--mock-data", "--train-iters", "9", "--load", str(ckpt), "--save",
            str(tmp_path / "longer")]  # fmt: skip
    text = _run(args, tmp_path / "longer.log", expect_rc=1)
    assert "--override-opt-param-scheduler" in text and "AssertionError" not in text
    assert FIRST_STEP not in text
    text = _run([*args, "--override-opt-param-scheduler"], tmp_path / "ok.log")
    assert sorted(losses(text)) == [7, 8, 9]


def test_a_second_run_on_the_same_save_dir_is_refused(tmp_path):
    """While another process holds the --save lock (a training run takes it: see the
    ``reference`` fixture), a run on the same directory is refused, naming the holder."""
    ckpt = tmp_path / "ckpt"
    holder_script = (
        "import sys, time\n"
        "from mhc_megatron.training.run_lock import RunLock\n"
        "lock = RunLock(sys.argv[1])\n"
        "lock.acquire()  # held while the object lives\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", holder_script, str(ckpt)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        holding = (ckpt / "mhc_run.lock").read_text().strip()
        assert f"pid {holder.pid}" in holding
        common = [*RUN_FLAGS, "--mock-data", "--save", str(ckpt), "--load", str(ckpt)]
        text = _run([*common, "--train-iters", "5"], tmp_path / "second.log", expect_rc=1)
        assert "another run is using --save" in text and holding in text
        assert FIRST_STEP not in text
    finally:
        kill_tree(holder)
        holder.wait()
