"""The mHC stability diagnostics in a training run's log and TensorBoard.

Every ``--mhc-diagnostics-interval`` iterations one micro-batch of the training step is recorded
(``mhc_megatron.megatron.diagnostics.RECORDER``), the records of every pipeline stage are
gathered, and the statistics go to TensorBoard (``mhc-stability/...``) and one log line.
``megatron_patches.install`` puts :func:`train_step_with_diagnostics` in place of Megatron's
``train_step``.
"""

import functools

from mhc_megatron.megatron.diagnostics import (
    RECORDER,
    gather_records,
    stability_statistics,
    summarize,
)


def write_tensorboard(writer, stats: dict[str, dict[str, float]], iteration: int) -> None:
    """``mhc-stability/<metric>/<site>`` per site and ``mhc-stability/<headline>`` scalars."""
    for key, values in stats.items():
        for name, value in values.items():
            writer.add_scalar(f"mhc-stability/{name}/{key}", value, iteration)
    for name, value in summarize(stats).items():
        writer.add_scalar(f"mhc-stability/{name}", value, iteration)
    writer.flush()


def train_step_with_diagnostics(step, interval: int):
    """Megatron's ``train_step`` recording one micro-batch every ``interval`` iterations.

    Megatron calls ``megatron.training.training.train_step`` once per iteration with
    ``args.curr_iteration`` set to the iterations done; the wrapper arms ``RECORDER`` around due
    steps, gathers the records of every pipeline stage, writes TensorBoard scalars at the step
    Megatron's own scalars use (iterations done after the step) and prints the headline numbers
    on the last rank.

    Args:
        step: Megatron's ``train_step``.
        interval: record every this many iterations (> 0).
    """
    from megatron.core import parallel_state
    from megatron.training import get_args, get_tensorboard_writer
    from megatron.training.utils import print_rank_last

    @functools.wraps(step)
    def train_step_recording(*args, **kwargs):
        iteration = get_args().curr_iteration + 1
        due = iteration % interval == 0
        if due:
            RECORDER.arm(max_records=1)
        try:
            result = step(*args, **kwargs)
        finally:
            RECORDER.disarm()
        if due:
            records = gather_records(
                RECORDER.records, parallel_state.get_pipeline_model_parallel_group()
            )
            RECORDER.records = {}
            stats = stability_statistics(records)
            writer = get_tensorboard_writer()
            if writer is not None and stats:
                write_tensorboard(writer, stats, iteration)
            if stats:
                head = summarize(stats)
                print_rank_last(
                    f"mHC stability at iteration {iteration}: composite amax gain at the last "
                    f"site fwd {head['composite_fwd_gain_last']:.4g} bwd "
                    f"{head['composite_bwd_gain_last']:.4g}; largest single-site gain fwd "
                    f"{head['fwd_gain_max']:.4g} bwd {head['bwd_gain_max']:.4g}; largest "
                    f"|row sum - 1| {head['row_error_max']:.2e}, |column sum - 1| "
                    f"{head['col_error_max']:.2e} "
                    f"({len(stats)} sites)"
                )
        return result

    return train_step_recording
