"""A sweep run's result from its log, and a log of other settings refused instead of reused."""

import shlex
from pathlib import Path

import pytest

from mhc_megatron.sweep.grid import SweepError, load_grid
from mhc_megatron.sweep.plan import plan
from mhc_megatron.sweep.runlog import COMMAND_HEADER, parse_log, read_result
from tests.launching import REPO_ROOT
from tests.tools.sweep_helpers import GOOD, LOG, UNFINISHED_LOG


def test_parse_log_reads_the_final_validation_loss_and_the_tokens():
    result = parse_log(LOG)
    # The end-of-training evaluation on the validation set: not the in-training one, not test.
    assert result == {
        "iterations": 10,
        "samples": 40,
        "seq_length": 128,
        "tokens": 40 * 128,
        "final_val_loss": 5.151773,
    }
    # Last iteration not logged: iterations x global batch.
    unlogged = LOG.replace("iteration       10/", "iteration        9/")
    assert parse_log(unlogged)["samples"] == 40
    assert parse_log(LOG.replace("5.151773E+00", "NAN"))["final_val_loss"] != 0  # NaN
    assert parse_log(UNFINISHED_LOG) is None
    with pytest.raises(SweepError, match="no Megatron argument dump"):
        parse_log(LOG.replace("  seq_length", "  seq_len"))


def test_a_run_trained_with_other_settings_is_not_reused(tmp_path):
    """The grid changed after a run finished (another --train-iters): refused, saying what to do.
    An unfinished run without a checkpoint may be relaunched with the new settings."""
    path = tmp_path / "grid.yaml"
    path.write_text(GOOD)
    run = plan(load_grid(path, tmp_path / "out"), quiet=True)[0]
    Path(run.run_dir).mkdir(parents=True)
    old = [a if a != "20" else "10" for a in run.command()]
    header = f"{COMMAND_HEADER}{shlex.join(old)}\n"
    Path(run.log).write_text(header + LOG)
    message = (
        rf"run s1-short-residual in {run.run_dir} was launched with other settings than the "
        rf"grid now gives it:\n  then: .*--train-iters 10\n  now:  .*--train-iters 20\n"
        rf"delete {run.run_dir} to train it again"
    )
    with pytest.raises(SweepError, match=message):
        read_result(run)
    Path(run.log).write_text(header + UNFINISHED_LOG)
    assert read_result(run) is None
    tracker = Path(run.run_dir, "checkpoints", "latest_checkpointed_iteration.txt")
    tracker.parent.mkdir()
    tracker.write_text("5")  # it would resume from there with the other settings
    with pytest.raises(SweepError, match="launched with other settings"):
        read_result(run)
    # The same settings from another checkout and output directory: the same run.
    moved = [a.replace(str(REPO_ROOT), "/elsewhere") for a in run.command()]
    Path(run.log).write_text(f"{COMMAND_HEADER}{shlex.join(moved)}\n{LOG}")
    assert read_result(run)["final_val_loss"] == 5.151773
