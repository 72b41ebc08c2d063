"""A sweep run's log: its result, the settings it was launched with, its last error.

Every launch appends to the run's ``train.log``: first the sweep's own header lines
(``COMMAND_HEADER`` and the command), then Megatron's output, read with
``mhc_megatron.megatron_log``.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from mhc_megatron import megatron_log
from mhc_megatron.sweep.grid import Run, SweepError

# Each launch writes its command line into the log: a later plan with other settings for the
# same run directory is caught instead of silently reusing (or resuming) the old run.
COMMAND_HEADER = "# scaling_sweep command: "
COMMAND_RE = re.compile("^" + re.escape(COMMAND_HEADER) + "(.*)$", re.MULTILINE)
ERROR_RE = re.compile(r"(Error|error:|Traceback|Killed|exitcode)")


def parse_log(text: str) -> dict | None:
    """A run's result from its log, or None when it holds no final validation loss.

    Args:
        text: the log.

    Returns:
        {"iterations", "samples", "seq_length", "tokens", "final_val_loss"}; the last launch
        wins where a resumed run's log holds several.

    Raises:
        SweepError: the log lacks what the tokens are computed from.
    """
    finals = megatron_log.validation_losses(text)
    if not finals:
        return None
    iteration, loss = finals[-1]  # float() read it: NAN too
    dump = megatron_log.arguments(text)
    try:
        seq_length = int(dump["seq_length"])
        global_batch = int(dump["global_batch_size"])
    except (KeyError, ValueError):
        raise SweepError(
            "the log has no Megatron argument dump (seq_length, global_batch_size): keep "
            "pretrain_mhc.py's output in the log"
        ) from None
    samples = {
        log.iteration: int(log.fields["consumed samples"])
        for log in megatron_log.iterations(text)
        if "consumed samples" in log.fields
    }.get(iteration)
    if samples is None:  # the last iteration not logged (--log-interval not dividing it)
        if dump.get("rampup_batch_size", "None") != "None":
            raise SweepError(
                "with --rampup-batch-size the tokens come from the log line of the last "
                "iteration: make --log-interval divide --train-iters"
            )
        samples = iteration * global_batch
    return {
        "iterations": iteration,
        "samples": samples,
        "seq_length": seq_length,
        "tokens": samples * seq_length,
        "final_val_loss": loss,
    }


def _settings(command: list[str]) -> tuple[list[str], list[str]]:
    """(environment but OUT_DIR, recipe and arguments) of a run's command.

    What defines the run, wherever the output directory and the repository are.
    """
    at = next((i for i, a in enumerate(command) if a.endswith("/run.sh")), 0)
    return sorted(a for a in command[1:at] if not a.startswith("OUT_DIR=")), command[at + 1 :]


def read_result(run: Run) -> dict | None:
    """The run's result from its log (``parse_log``).

    Args:
        run: the run.

    Returns:
        the result, or None when the run has not finished.

    Raises:
        SweepError: the log is of a run with other settings that finished or saved a checkpoint.
    """
    try:
        text = Path(run.log).read_text(errors="replace")
    except FileNotFoundError:
        return None
    try:
        result = parse_log(text)
    except SweepError as error:
        raise SweepError(f"run {run.name}: {error} ({run.log})") from None
    logged = COMMAND_RE.findall(text)
    checkpoint = Path(run.run_dir, "checkpoints", "latest_checkpointed_iteration.txt")
    # An unfinished run without a checkpoint starts afresh: a changed grid may relaunch it.
    if logged and (result is not None or checkpoint.exists()):
        then, now = _settings(shlex.split(logged[-1])), _settings(run.command())
        if then != now:
            raise SweepError(
                f"run {run.name} in {run.run_dir} was launched with other settings than the "
                f"grid now gives it:\n  then: {shlex.join(then[0] + then[1])}\n  now:  "
                f"{shlex.join(now[0] + now[1])}\ndelete {run.run_dir} to train it again, or "
                f"give the sweep another --out"
            )
    return result


def last_error(log: str) -> str:
    """The last line of a log that looks like an error, to name a failure.

    Args:
        log: the log's path.

    Returns:
        the line (at most 200 characters), else the last line, "empty log" or "no log".
    """
    try:
        lines = Path(log).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "no log"
    for line in reversed(lines):
        if ERROR_RE.search(line) and "error_file" not in line:
            return line.strip()[:200]
    return lines[-1].strip()[:200] if lines else "empty log"
