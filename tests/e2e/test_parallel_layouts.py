"""Every Megatron parallel layout trains the same mHC + MoE model as one rank, and torch_dist
checkpoints resume across layouts (CPU, gloo, ranks as processes).

Protocol. A single-rank run trains one step of a tiny MoE mHC model and saves a torch_dist
checkpoint (``initial``); the single-rank reference and every layout load it and train steps
2-4 on the same mock data. Starting from one checkpoint matters: Megatron seeds pipeline stages
differently, so layouts would otherwise start from different weights; distributed checkpointing
re-shards the one checkpoint for each layout, which is itself under test. The model: 4 layers
(one leading dense layer, then MoE with 4 routed experts top-2 and a shared expert), hidden 64,
n = 4 streams, Sinkhorn mHC with the learned collapse head, no dropout, distributed optimizer
with the fully reshardable checkpoint format (the default ``dp_reshardable`` format only
re-shards over data parallelism).

Layouts. Each launch costs 10-25 s, so a layout that another one strictly extends is not run on
its own; the extended one still compares every step with the single rank:

- TP2 + SP: in ``tp2_pp2`` (and, with EP2, in ``tp2_sp_ep2_mhc_recompute_2`` and
  ``tp2_sp_ep2_grouped_mhc_recompute_2``); TP2 without SP on the dense model
  (``test_tp2_without_sequence_parallel_dense``).
- PP2: in ``pp2_ep2`` (without stream recompute), ``pp2_mhc_recompute``, ``tp2_pp2`` and
  ``pp2_full_recompute_block_mhc_recompute``; interleaved PP2 in
  ``pp2_interleaved_mhc_recompute_1_selective``.
- EP2: alltoall in ``ep2_alltoall`` (SequentialMLP) and with TP2 + SP in the ``tp2_sp_ep2_*``
  layouts; allgather in ``ep2_allgather_grouped_moe_act``.
- DP2 with the distributed optimizer: ``dp2_distributed_optimizer`` (and the DP the 4-rank
  layouts leave).
- Recompute: mHC stream recompute, Megatron's selective (``moe_act``) and full recompute.
- Grouped-GEMM experts (``--moe-grouped-gemm``): the ``*_grouped_*`` layouts load the
  SequentialMLP checkpoint and train the same; one of them saves, and its checkpoint resumes as
  SequentialMLP on one rank.

Checkpoints resume across layouts: one rank into each layout (every layout run loads the
one-rank ``initial``, optimizer state included), TP2 + SP + PP2 into EP2, grouped experts under
TP2 + SP + EP2 into SequentialMLP on one rank, and in the same layout bitwise.

Compared per step, from TensorBoard (float32 values, not the 4-7 digits of the log lines):
``lm loss`` and ``grad-norm``.

Tolerances: layouts add the same float32 numbers in different orders (TP splits matmul
reductions, SP reduce-scatters, DP/EP split the batch sum, PP and EP move tokens between ranks).
Measured on this model, layouts differ from the single rank by at most one float32 ulp (relative
9e-8) in loss and gradient norm; the bound, 2e-6, allows ~20 ulps for other CPUs' kernels. A real
mistake is far larger: without the sum of the mHC gradients over the TP group under sequence
parallelism (checked by removing it), TP2+SP's gradient norm moves by 8e-6 at the first step and
its loss by 2e-5 at the second, and the TP copies of the mHC parameters drift apart by 1e-2.
A resume in the same layout repeats the same arithmetic and must match bitwise.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.launching import CPU_LOCAL_FLAGS, REPO_ROOT, launch

DRIVER = REPO_ROOT / "tests" / "e2e" / "pretrain_mhc_checking_replicas.py"
LAUNCH_TIMEOUT_S = 300
# float32 reduction order: measured <= 1 ulp (9e-8 relative), see the module docstring.
LOSS_RTOL = 2e-6
GRAD_NORM_RTOL = 2e-6
STEPS = [2, 3, 4]

TINY_MOE_MHC = [
    *CPU_LOCAL_FLAGS,
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--max-position-embeddings", "32", "--position-embedding-type", "rope",
    "--normalization", "RMSNorm", "--swiglu",
    "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "64",
    "--moe-layer-freq", "[0,1,1,1]", "--moe-shared-expert-intermediate-size", "64",
    "--mhc-variant", "mhc", "--mhc-num-streams", "4", "--mhc-collapse", "head",
    "--hidden-dropout", "0", "--attention-dropout", "0",
    "--micro-batch-size", "2", "--global-batch-size", "8",
    "--lr", "3e-3", "--lr-decay-style", "constant",
    "--use-distributed-optimizer", "--dist-ckpt-optim-fully-reshardable",
    "--ckpt-format", "torch_dist",
    "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "0",
    "--mock-data", "--tokenizer-type", "NullTokenizer",
    # 256 is a multiple of 128 * TP for TP 1 and 2: the padded vocabulary is the same.
    "--vocab-size", "256", "--make-vocab-size-divisible-by", "128",
    "--use-cpu-initialization", "--seed", "1234",
    "--train-iters", "4",
    # Stability diagnostics at steps 2 and 4: every layout must gather all 8 sites.
    "--mhc-diagnostics-interval", "2",
]  # fmt: skip
# Megatron refuses MoE with tensor parallelism but without sequence parallelism
# (moe_layer.py:629), so TP2 without SP is checked on the dense version of the model.
TINY_DENSE_MHC = [
    a for i, a in enumerate(TINY_MOE_MHC)
    if not a.startswith("--moe") and a != "--num-experts"
    and not (i and TINY_MOE_MHC[i - 1].startswith(("--moe", "--num-experts")))
]  # fmt: skip

TP2 = ["--tensor-model-parallel-size", "2"]
SP = ["--sequence-parallel"]
PP2 = ["--pipeline-model-parallel-size", "2"]
EP2 = ["--expert-model-parallel-size", "2"]
ALLTOALL = ["--moe-token-dispatcher-type", "alltoall"]
ALLGATHER = ["--moe-token-dispatcher-type", "allgather"]

# name: (ranks, flags). DP fills the ranks the other dimensions leave. TP2 + SP, plain PP2,
# plain interleaved PP2, TP2 + SP + EP2 and EP2 with allgather run only inside the layouts that
# extend them (the module docstring lists where).
LAYOUTS = {
    "ep2_alltoall": (2, [*EP2, *ALLTOALL]),
    "dp2_distributed_optimizer": (2, []),
    "tp2_pp2": (4, [*TP2, *SP, *PP2]),
    "pp2_ep2": (4, [*PP2, *EP2, *ALLTOALL]),
    # Stream recompute (--mhc-recompute) must not change the training: one block per stage;
    # blocks of one layer with Megatron's own selective recompute on virtual stages; blocks of
    # two layers under TP, SP and EP.
    "pp2_mhc_recompute": (2, [*PP2, "--mhc-recompute"]),
    "pp2_interleaved_mhc_recompute_1_selective": (
        2,
        [
            *PP2,
            "--num-layers-per-virtual-pipeline-stage",
            "1",
            "--mhc-recompute",
            "1",
            "--recompute-granularity",
            "selective",
        ],
    ),
    "tp2_sp_ep2_mhc_recompute_2": (4, [*TP2, *SP, *EP2, *ALLTOALL, "--mhc-recompute", "2"]),
    # Grouped-GEMM experts (--moe-grouped-gemm without TE: GroupedGemmMLP) load the initial
    # SequentialMLP checkpoint and train the same: under expert TP + SP + EP with stream
    # recompute, and with the allgather dispatcher and Megatron's moe_act recompute.
    "tp2_sp_ep2_grouped_mhc_recompute_2": (
        4,
        [*TP2, *SP, *EP2, *ALLTOALL, "--moe-grouped-gemm", "--mhc-recompute", "2"],
    ),
    "ep2_allgather_grouped_moe_act": (
        2,
        [
            *EP2,
            *ALLGATHER,
            "--moe-grouped-gemm",
            "--recompute-granularity",
            "selective",
            "--recompute-modules",
            "moe_act",
        ],
    ),
    # Megatron's full recompute re-runs whole mHC layers; with --mhc-recompute inside it too.
    "full_recompute_uniform": (
        1,
        [
            "--recompute-granularity",
            "full",
            "--recompute-method",
            "uniform",
            "--recompute-num-layers",
            "1",
        ],
    ),
    "pp2_full_recompute_block_mhc_recompute": (
        2,
        [
            *PP2,
            "--recompute-granularity",
            "full",
            "--recompute-method",
            "block",
            "--recompute-num-layers",
            "1",
            "--mhc-recompute",
        ],
    ),
}
# Layouts that also save at iteration 3: those test_checkpoint_resumes_in_another_layout
# resumes from.
SAVING_LAYOUTS = ("tp2_pp2", "tp2_sp_ep2_grouped_mhc_recompute_2")

REPLICA_RE = re.compile(r"mhc tp replicas: (\d+) tensors on (\d+) ranks, max \|difference\| (\S+)")


class Run:
    """One finished launch: its output and its TensorBoard scalars."""

    def __init__(self, text: str, tensorboard_dir: Path, seconds: float):
        self.text = text
        self.seconds = seconds
        self.loss = _scalars(tensorboard_dir, "lm loss")
        self.grad_norm = _scalars(tensorboard_dir, "grad-norm")
        self.diagnostics = _scalars_under(tensorboard_dir, "mhc-stability/")

    def replica_differences(self) -> list[float]:
        return [float(d) for _, _, d in REPLICA_RE.findall(self.text)]


def _scalars(tensorboard_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in sorted(tensorboard_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values.update({e.step: e.value for e in accumulator.Scalars(tag)})
    return values


def _scalars_under(tensorboard_dir: Path, prefix: str) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, dict[int, float]] = {}
    for events in sorted(tensorboard_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            if tag.startswith(prefix):
                values.setdefault(tag, {}).update(
                    {e.step: e.value for e in accumulator.Scalars(tag)}
                )
    return values


def _train(work: Path, name: str, nproc: int, args: list[str]) -> Run:
    import time

    tensorboard_dir = work / f"{name}_tb"
    args = [*args, "--tensorboard-dir", str(tensorboard_dir)]
    start = time.monotonic()
    rc, text = launch(DRIVER, nproc, args, work / f"{name}.log", timeout_s=LAUNCH_TIMEOUT_S)
    seconds = time.monotonic() - start
    if rc != 0:
        what = f"timed out after {LAUNCH_TIMEOUT_S} s" if rc is None else f"exited with {rc}"
        pytest.fail(f"{name} (nproc {nproc}) {what}; {work / name}.log:\n{text[-6000:]}")
    return Run(text, tensorboard_dir, seconds)


def _resume(
    work: Path,
    name: str,
    nproc: int,
    model: list[str],
    layout: list[str],
    load: Path,
    step: int = 1,
    save: Path | None = None,
) -> Run:
    """Train until step 4 from the checkpoint of ``step`` in ``load``; fail unless it loaded."""
    args = [*model, *layout, "--load", str(load), "--ckpt-step", str(step)]
    args.append("--exit-on-missing-checkpoint")
    if save is not None:
        args += ["--save", str(save), "--save-interval", "3"]
    run = _train(work, name, nproc, args)
    assert "successfully loaded checkpoint from" in run.text, run.text[-3000:]
    return run


def _initial_checkpoint(work: Path, model: list[str]) -> Path:
    """Single rank, one step, saved (``--exit-interval 1`` keeps --train-iters at 4, so the
    resumed runs' LR schedule matches the checkpoint's)."""
    ckpt = work / "initial"
    args = [*model, "--save", str(ckpt), "--save-interval", "100", "--exit-interval", "1"]
    _train(work, "initial", 1, args)
    assert (ckpt / "iter_0000001" / "metadata.json").is_file()
    return ckpt


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """The MoE model's initial checkpoint and single-rank reference (which saves at 3)."""
    work = tmp_path_factory.mktemp("layouts_moe")
    initial = _initial_checkpoint(work, TINY_MOE_MHC)
    reference = _resume(work, "reference", 1, TINY_MOE_MHC, [], initial, save=work / "ref_ckpt")
    assert sorted(reference.loss) == STEPS and sorted(reference.grad_norm) == STEPS
    return work, initial, reference


@pytest.fixture(scope="module")
def layout_runs(moe):
    """Runs each layout lazily, once, from the initial checkpoint."""
    work, initial, _ = moe
    runs: dict[str, Run] = {}

    def get(name: str) -> Run:
        if name not in runs:
            nproc, layout = LAYOUTS[name]
            save = work / f"{name}_ckpt" if name in SAVING_LAYOUTS else None
            runs[name] = _resume(work, name, nproc, TINY_MOE_MHC, layout, initial, save=save)
        return runs[name]

    return get


def _assert_same_training(run: Run, reference: Run, steps=STEPS) -> None:
    for step in steps:
        assert run.loss[step] == pytest.approx(reference.loss[step], rel=LOSS_RTOL), step
        assert run.grad_norm[step] == pytest.approx(
            reference.grad_norm[step], rel=GRAD_NORM_RTOL
        ), step


COMPOSITE_TAG = "mhc-stability/composite_fwd_gain/L"


def run_sees_the_reference_tokens(name: str) -> bool:
    """Whether the last rank's first micro-batch is the reference's: no data parallelism (EP
    and extra ranks split the batch) and no sequence parallelism (it splits the tokens)."""
    nproc, layout = LAYOUTS[name]
    return "--sequence-parallel" not in layout and nproc == (2 if "pp2" in name else 1)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_trains_the_single_rank_model(name, moe, layout_runs):
    _, _, reference = moe
    run = layout_runs(name)
    _assert_same_training(run, reference)
    if "mhc_recompute" in name:
        assert "mHC recompute: blocks of" in run.text
    experts = "GroupedGemmMLP" if "grouped" in name else "SequentialMLP"
    assert f"MoE experts: {experts}, " in run.text
    # The diagnostics see every site, gathered over pipeline stages, at steps 2 and 4.
    assert run.diagnostics.keys() == reference.diagnostics.keys()
    assert len([t for t in reference.diagnostics if t.startswith(COMPOSITE_TAG)]) == 8
    assert all(sorted(v) == [2, 4] for v in run.diagnostics.values())
    if run_sees_the_reference_tokens(name):
        # Same micro-batch, same weights to float32 rounding: the same numbers.
        for tag, values in reference.diagnostics.items():
            for step, value in values.items():
                assert run.diagnostics[tag][step] == pytest.approx(value, rel=1e-5, abs=1e-7)
    if "tp2" in name:
        differences = run.replica_differences()
        assert len(differences) >= 3 * 4  # 3 steps x 4 micro-batches (more with PP/DP)
        assert max(differences) == 0.0, "mHC parameters differ between tensor-parallel ranks"


def test_tp2_without_sequence_parallel_dense(tmp_path):
    """TP2 without SP: each TP rank sees all tokens, so the mHC gradients agree without any
    reduction and the replicated parameters must stay identical.

    Both runs train steps 1-4 from scratch: with --use-cpu-initialization the weights are built
    whole on one generator and then split, and without pipeline stages Megatron seeds TP1 and
    TP2 alike, so both start from the same model (step 1 compares it) without an initial
    checkpoint to load.
    """
    assert "--num-experts" not in TINY_DENSE_MHC and "--sequence-parallel" not in TINY_DENSE_MHC
    assert "--use-cpu-initialization" in TINY_DENSE_MHC
    reference = _train(tmp_path, "reference", 1, TINY_DENSE_MHC)
    run = _train(tmp_path, "tp2", 2, [*TINY_DENSE_MHC, *TP2])
    steps = [1, *STEPS]
    assert sorted(reference.loss) == sorted(run.loss) == steps
    _assert_same_training(run, reference, steps=steps)
    differences = run.replica_differences()
    assert len(differences) >= 4 * 4  # 4 steps x 4 micro-batches
    assert max(differences) == 0.0, "mHC parameters differ between tensor-parallel ranks"


def test_resume_in_the_same_layout_is_bitwise(moe):
    """Single rank, saved at 3 by the reference, resumed: step 4 repeats exactly."""
    work, _, reference = moe
    resumed = _resume(work, "resume_tp1_from_tp1", 1, TINY_MOE_MHC, [], work / "ref_ckpt", step=3)
    assert sorted(resumed.loss) == [4]
    assert resumed.loss[4] == reference.loss[4]
    assert resumed.grad_norm[4] == reference.grad_norm[4]


@pytest.mark.parametrize(
    "saved_by, resumed_as",
    [
        # TP2 + SP + PP2's checkpoint into EP2. One rank into every layout is what each layout
        # run does (it loads the one-rank ``initial``, optimizer state included); many shards
        # into one rank is the grouped pair below.
        ("tp2_pp2", "ep2_alltoall"),
        # grouped-GEMM experts' checkpoint into SequentialMLP, from EP2 + ETP2 to one rank
        ("tp2_sp_ep2_grouped_mhc_recompute_2", "single_rank"),
    ],
)
def test_checkpoint_resumes_in_another_layout(saved_by, resumed_as, moe, layout_runs):
    """Saved at iteration 3 in one layout, resumed in another: step 4 continues the saving run's
    curve (to the layout tolerance: the two layouts add in different orders)."""
    work, _, reference = moe
    saver = layout_runs(saved_by)
    load = work / f"{saved_by}_ckpt"
    nproc, layout = (1, []) if resumed_as == "single_rank" else LAYOUTS[resumed_as]
    name = f"resume_{resumed_as}_from_{saved_by}"
    resumed = _resume(work, name, nproc, TINY_MOE_MHC, layout, load, step=3)
    assert "at iteration 3" in resumed.text
    assert sorted(resumed.loss) == [4]
    _assert_same_training(resumed, saver, steps=[4])
    _assert_same_training(resumed, reference, steps=[4])
