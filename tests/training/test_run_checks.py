"""The pre-run checks of mhc_megatron/training/run_checks.py without a launch: model identity,
the padded vocabulary across TP, the load directory, the indexed data and the run lock.
tests/e2e/test_run_safety.py runs the same checks through pretrain_mhc.py."""

import argparse
import subprocess
import sys

import numpy as np
import pytest

from mhc_megatron.training import run_checks
from mhc_megatron.training.run_checks import RunCheckError


def _args(**overrides):
    base = dict(
        num_layers=4, hidden_size=128, num_attention_heads=4, group_query_attention=False,
        num_query_groups=1, mhc_variant="mhc", mhc_num_streams=4, mhc_collapse="head",
        vocab_size=257, padded_vocab_size=384, tokenizer_type="NullTokenizer",
        moe_layer_freq=[0, 1, 1, 1], add_bias_linear=False, tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1, mhc_backend="auto", mhc_recompute="none",
        position_embedding_type="rope", max_position_embeddings=128,
    )  # fmt: skip
    base.update(overrides)
    return argparse.Namespace(**base)


def test_a_layout_change_is_not_a_model_change():
    layout = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                  mhc_backend="triton", mhc_recompute="stage")  # fmt: skip
    assert run_checks.model_differences(_args(), _args(**layout)) == []


def test_model_changes_are_listed_with_the_flag_to_pass():
    ckpt = _args()
    run = _args(mhc_variant="hc", hidden_size=64, add_bias_linear=True, moe_layer_freq=[0, 1])
    differences = run_checks.model_differences(ckpt, run)
    names = [name for name, _, _ in differences]
    assert names == ["hidden_size", "add_bias_linear", "moe_layer_freq", "mhc_variant"]
    info = run_checks.CheckpointInfo(None, 7, False, None, "torch_dist")
    message = run_checks.describe_differences(info, differences, run, run_checks.parser_actions())
    assert "hidden_size: checkpoint 128, this run 64  pass --hidden-size 128" in message
    assert "pass --disable-bias-linear" in message
    assert 'pass --moe-layer-freq "[0,1,1,1]"' in message
    assert "pass --mhc-variant mhc" in message and "iteration 7" in message


def test_optimizer_state_in_parameter_order_is_not_loaded_into_another_layout():
    """dp_reshardable distributed-optimizer state, saved with SequentialMLP experts, resumed with
    --moe-grouped-gemm (measured without this check, tiny model: step 3 matches, step 4's loss
    is 5.4463 instead of 5.4423, the Adam moments sit on other experts' weights), or at another
    EP size."""
    info = run_checks.CheckpointInfo(None, 2, False, None, "torch_dist")
    moe = dict(num_experts=4, transformer_impl="local", use_distributed_optimizer=True,
               dist_ckpt_optim_fully_reshardable=False)  # fmt: skip
    saved = _args(**moe, moe_grouped_gemm=False)
    grouped = _args(**moe, moe_grouped_gemm=True)
    with pytest.raises(RunCheckError) as refused:
        run_checks.check_optimizer_state_layout(info, saved, grouped)
    message = str(refused.value)
    assert "SequentialMLP" in message and "GroupedGemmMLP" in message
    assert "drop --moe-grouped-gemm" in message and "--no-load-optim" in message
    assert "--dist-ckpt-optim-fully-reshardable" in message
    with pytest.raises(RunCheckError, match="pass --moe-grouped-gemm"):
        run_checks.check_optimizer_state_layout(info, grouped, saved)
    with pytest.raises(RunCheckError, match="pass --transformer-impl local"):  # TEGroupedMLP
        run_checks.check_optimizer_state_layout(
            info, grouped, _args(**{**moe, "transformer_impl": "transformer_engine"},
                                 moe_grouped_gemm=True)
        )  # fmt: skip
    # Loadable: the same module; state saved by sharded keys; no optimizer state loaded; a dense
    # model; another optimizer.
    run_checks.check_optimizer_state_layout(info, saved, _args(**moe, moe_grouped_gemm=False))
    fully = _args(**{**moe, "dist_ckpt_optim_fully_reshardable": True}, moe_grouped_gemm=False)
    run_checks.check_optimizer_state_layout(info, fully, grouped)
    run_checks.check_optimizer_state_layout(info, saved, _args(**moe, moe_grouped_gemm=True,
                                                              no_load_optim=True))  # fmt: skip
    # The EP size too (Megatron's own loader fails on it with a shape mismatch deep inside).
    with pytest.raises(RunCheckError, match="expert_model_parallel_size: checkpoint 1, this run 2"):
        run_checks.check_optimizer_state_layout(
            info, _args(**moe, moe_grouped_gemm=False, expert_model_parallel_size=1),
            _args(**moe, moe_grouped_gemm=False, expert_model_parallel_size=2),
        )  # fmt: skip
    dense = dict(moe, num_experts=None)
    run_checks.check_optimizer_state_layout(
        info, _args(**dense, moe_grouped_gemm=False), _args(**dense, moe_grouped_gemm=True)
    )
    adam = dict(moe, use_distributed_optimizer=False)
    run_checks.check_optimizer_state_layout(
        info, _args(**adam, moe_grouped_gemm=False), _args(**adam, moe_grouped_gemm=True)
    )


def test_a_plain_megatron_checkpoint_is_a_residual_model():
    plain = _args()
    del plain.mhc_variant, plain.mhc_num_streams, plain.mhc_collapse
    assert run_checks.model_differences(plain, _args(mhc_variant="residual")) == []
    assert [d[0] for d in run_checks.model_differences(plain, _args())] == ["mhc_variant"]


@pytest.mark.parametrize(
    "ckpt_padded, run_padded, tp, adopted",
    [(384, 512, 2, 384), (129280, 129536, 4, 129280), (384, 640, 5, None), (384, 384, 1, None)],
)
def test_the_checkpoint_padded_vocabulary_is_kept_when_tp_divides_it(
    ckpt_padded, run_padded, tp, adopted
):
    run = _args(padded_vocab_size=run_padded, tensor_model_parallel_size=tp)
    note = run_checks.adopt_checkpoint_vocab(_args(padded_vocab_size=ckpt_padded), run)
    assert (note is not None) == (adopted is not None)
    assert run.padded_vocab_size == (adopted or run_padded)
    if adopted is None and ckpt_padded != run_padded:  # refused, with the TPs that would work
        differences = run_checks.model_differences(_args(padded_vocab_size=ckpt_padded), run)
        info = run_checks.CheckpointInfo(None, 1, False, None, "torch_dist")
        message = run_checks.describe_differences(info, differences, run, {})
        assert "cannot be split over TP 5" in message and "1, 2, 3, 4, 6, 8" in message


def test_load_dir_cases(tmp_path):
    save = tmp_path / "save"
    assert run_checks.inspect_load_dir(None, str(save)) is None
    assert run_checks.inspect_load_dir(str(save), str(save)) is None  # new run
    save.mkdir()
    (save / run_checks.LOCK_NAME).write_text("host x, pid 1")
    assert run_checks.inspect_load_dir(str(save), str(save)) is None  # empty but for the lock
    with pytest.raises(RunCheckError, match="does not exist"):
        run_checks.inspect_load_dir(str(tmp_path / "nope"), str(save))
    with pytest.raises(RunCheckError, match="is empty and is not the --save"):
        run_checks.inspect_load_dir(str(save), str(tmp_path / "other"))
    (save / "notes.txt").write_text("x")
    with pytest.raises(RunCheckError, match="is not a checkpoint directory"):
        run_checks.inspect_load_dir(str(save), str(save))
    (save / "iter_0000020").mkdir()
    with pytest.raises(RunCheckError, match="--ckpt-step N to load one"):
        run_checks.inspect_load_dir(str(save), str(save))
    (save / run_checks.TRACKER).write_text("30\n")
    with pytest.raises(RunCheckError, match="iter_0000030 does not exist .iterations here: 20"):
        run_checks.inspect_load_dir(str(save), str(save))
    with pytest.raises(RunCheckError, match="not a Megatron checkpoint"):
        run_checks.inspect_load_dir(str(save), str(save), ckpt_step=20)
    (save / "iter_0000020" / "metadata.json").write_text("{}")
    info = run_checks.inspect_load_dir(str(save), str(save), ckpt_step=20)
    assert (info.iteration, info.format) == (20, "torch_dist")


def _write_dataset(prefix, documents, dtype=np.uint16):
    """A Megatron indexed dataset (one sequence per document) written by Megatron's writer."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in documents:
        builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
    builder.finalize(prefix + ".idx")


def test_indexed_data_checks(tmp_path):
    prefix = str(tmp_path / "data")
    _write_dataset(prefix, [[1, 2, 3], [4, 5], [6, 7, 8, 9], [300]])
    info = run_checks.read_index(prefix)
    assert (info.documents, info.sequences) == (4, 4)
    assert list(info.tokens_before_document) == [0, 3, 5, 9, 10]
    assert run_checks.max_token_id(prefix, info) == (300, True)
    with pytest.raises(RunCheckError, match=r"data.bin holds token id 300.*257 ids"):
        run_checks.check_token_ids(prefix, info, 257, "NullTokenizer")
    run_checks.check_token_ids(prefix, info, 301, "NullTokenizer")
    # 4 documents, --split 90,10,0: valid gets round(0.9*4)..round(1.0*4) = 4..4, none.
    with pytest.raises(RunCheckError, match="valid split 0 of 4 documents"):
        run_checks.check_split(prefix, info, "90,10,0", [(0, 0.9), (0.9, 1.0), None])
    run_checks.check_split(prefix, info, "50,50,0", [(0, 0.5), (0.5, 1.0), None])
    # A .bin cut short, and an .idx of a smaller file next to a bigger .bin.
    data = open(prefix + ".bin", "rb").read()
    open(prefix + ".bin", "wb").write(data[:-2])
    with pytest.raises(RunCheckError, match="it is truncated"):
        run_checks.read_index(prefix)
    other = str(tmp_path / "small")
    _write_dataset(other, [[1, 2]])
    open(other + ".bin", "wb").write(data)
    with pytest.raises(RunCheckError, match="describes only part of it"):
        run_checks.read_index(other)
    index = open(prefix + ".idx", "rb").read()
    open(prefix + ".idx", "wb").write(index[:40])
    with pytest.raises(RunCheckError, match="truncated or damaged"):
        run_checks.read_index(prefix)


def test_the_run_lock_names_the_holder(tmp_path):
    lock = run_checks.RunLock(str(tmp_path / "save"))
    lock.acquire()
    try:
        probe = (
            "import sys; from mhc_megatron.training.run_checks import RunLock, RunCheckError\n"
            f"try:\n    RunLock({str(tmp_path / 'save')!r}).acquire()\n"
            "except RunCheckError as e:\n    print(e); sys.exit(3)\n"
        )
        other = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        assert other.returncode == 3, other.stderr
        assert "another run is using --save" in other.stdout
        assert f"pid {__import__('os').getpid()}" in other.stdout
    finally:
        lock.release()
    again = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert again.returncode == 0, again.stdout  # released: the next run takes it


def test_too_many_streams_is_a_config_error():
    from mhc_megatron.megatron.config import MHCConfigError, MHCTransformerConfig

    with pytest.raises(MHCConfigError, match="from 1 to 16"):
        MHCTransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                             mhc_num_streams=100)  # fmt: skip


def test_batch_token_ids_outside_the_vocabulary_are_refused():
    import torch

    good = {"tokens": torch.tensor([[0, 5, 256]]), "labels": torch.tensor([[5, 256, 0]])}
    run_checks.check_batch_token_ids(good, 257, "NullTokenizer")
    for key, bad, value in (("tokens", 257, 257), ("labels", -1, -1)):
        batch = {**good, key: torch.tensor([[1, value]])}
        with pytest.raises(RunCheckError, match=rf"a training batch \('{key}'\) holds token id "
                           rf"{bad}, outside the 257 ids"):  # fmt: skip
            run_checks.check_batch_token_ids(batch, 257, "NullTokenizer")


def test_learning_rate_schedules_megatron_would_assert_on_are_refused():
    def schedule(**overrides):
        settings = dict(lr=3e-4, min_lr=3e-5, train_iters=20, lr_decay_iters=None,
                        lr_warmup_iters=2, lr_warmup_fraction=None, train_samples=None)  # fmt: skip
        return argparse.Namespace(**(settings | overrides))

    run_checks.check_schedule(schedule())  # a warmup of 2 out of 20 iterations is fine
    run_checks.check_schedule(schedule(train_iters=None, train_samples=100, lr_decay_samples=None,
                                       lr_warmup_samples=10))  # fmt: skip
    cases = [
        (dict(lr_warmup_iters=20), r"warmup \(20 iterations, --lr-warmup-iters\).*\(20 iter"),
        (dict(lr_warmup_fraction=1.0), r"--lr-warmup-fraction"),
        (dict(lr_decay_iters=2), r"\(2 iterations, --lr-decay-iters"),
        (dict(min_lr=1e-3), r"--min-lr 0.001 is above --lr 0.0003"),
    ]
    for overrides, message in cases:
        with pytest.raises(RunCheckError, match=message):
            run_checks.check_schedule(schedule(**overrides))
