"""mhc_megatron/megatron_log.py on lines Megatron-Core 0.19.2 printed (a CPU run of this repo)."""

import pytest

from mhc_megatron import megatron_log

ITERATION_1 = (
    " [2026-12-05 16:55:58.903632] iteration        1/     200 | consumed samples:            4 |"
    " elapsed time per iteration (ms): 486.6 | learning rate: 3.000000E-04 | global batch size:"
    "     4 | lm loss: 5.918145E+00 | loss scale: 1.0 | grad norm: 6.168 | number of skipped"
    " iterations:   0 | number of nan iterations:   0 |"
)
ITERATION_10 = ITERATION_1.replace("1/     200", "10/     200").replace("5.918145", "5.395509")
VALIDATION = (
    " validation loss at iteration 6 on validation set | lm loss value: 5.225335E+00 |"
    " lm loss PPL: 1.859234E+02 | "
)
IN_TRAINING = (
    " validation loss at iteration 4 | lm loss value: 5.300000E+00 | lm loss PPL: 2E+02 | "
)
TEST_SET = VALIDATION.replace("validation set", "test set").replace("5.225335", "5.228279")
ARGUMENT_DUMP = """\
------------------------ arguments ------------------------
  global_batch_size ............................... 4
  lr .............................................. 0.003
  rampup_batch_size ............................... None
  seq_length ...................................... 64
  moe_layer_freq .................................. [0, 1]
-------------------- end of arguments ---------------------
"""
TIMER = "    evaluate .......................................: (17.93, 18.65)"


def test_an_iteration_line_gives_every_field():
    (log,) = megatron_log.iterations(f"noise\n{ITERATION_1}\nmore noise\n")
    assert (log.iteration, log.train_iters) == (1, 200)
    assert log.fields == {
        "consumed samples": "4",
        "elapsed time per iteration (ms)": "486.6",
        "learning rate": "3.000000E-04",
        "global batch size": "4",
        "lm loss": "5.918145E+00",
        "loss scale": "1.0",
        "grad norm": "6.168",
        "number of skipped iterations": "0",
        "number of nan iterations": "0",
    }
    assert log.number("lm loss") == 5.918145
    assert log.number("learning rate") == 3e-4
    with pytest.raises(KeyError, match=r"no 'mtp loss'.*it has \['consumed samples'"):
        log.number("mtp loss")


def test_losses_of_a_resumed_run_keep_the_last_line_of_each_iteration():
    resumed = ITERATION_1.replace("5.918145", "6.000000")
    text = "\n".join([ITERATION_1, ITERATION_10, VALIDATION, resumed])
    assert [log.iteration for log in megatron_log.iterations(text)] == [1, 10, 1]
    assert megatron_log.losses(text) == {1: 6.0, 10: 5.395509}
    # Validation lines are no iteration lines (no "N/ M").
    assert megatron_log.iterations("\n".join([VALIDATION, IN_TRAINING])) == []


def test_validation_losses_are_the_ones_on_the_validation_set():
    text = "\n".join([IN_TRAINING, ITERATION_10, VALIDATION, TEST_SET])
    assert megatron_log.validation_losses(text) == [(6, 5.225335)]
    assert megatron_log.VALIDATION_MARKER in VALIDATION
    assert all(megatron_log.VALIDATION_MARKER not in line for line in (IN_TRAINING, TEST_SET))
    (nan,) = megatron_log.validation_losses(VALIDATION.replace("5.225335E+00", "nan"))
    assert nan[0] == 6 and nan[1] != nan[1]  # NaN: a diverged run's loss is kept, not dropped
    assert megatron_log.validation_losses(ITERATION_10) == []


def test_the_argument_dump_and_a_later_one_wins():
    args = megatron_log.arguments(f"{ARGUMENT_DUMP}{TIMER}\n{ITERATION_1}\n")
    assert args == {
        "global_batch_size": "4",
        "lr": "0.003",
        "rampup_batch_size": "None",
        "seq_length": "64",
        "moe_layer_freq": "[0, 1]",
    }
    relaunched = ARGUMENT_DUMP + ARGUMENT_DUMP.replace(" 64\n", " 128\n")
    assert megatron_log.arguments(relaunched)["seq_length"] == "128"
    assert megatron_log.arguments(TIMER) == {}
