"""CPU mode (``mhc_megatron.training.cpu``): Megatron's ``pretrain()`` end to end on CPU with gloo.

The launches run ``pretrain_mhc.py --mhc-variant residual`` (a plain GPT) with torchrun on a
tiny MoE model (2 layers, hidden 64, 4 heads, 4 experts top-2, sequence 64, micro batch 2, global
batch 4, mock data): one rank trains, logs to TensorBoard and saves a torch_dist checkpoint; two
data-parallel ranks with the distributed optimizer save in Megatron's default ``dp_reshardable``
format and resume from it, with dropout on, repeating the saved run's losses exactly (so the
checkpoint restores the RNG state CPU mode uses for dropout). Each launch costs about 8-14 s on 2
cores (mostly start-up), so every launch checks several things. A missing data path fails before
Megatron starts; the CUDA redirection and CPU mode's refusals are checked in-process.

Elsewhere: CPU mode under TP (with and without SP), PP, interleaved PP, EP (alltoall and
allgather) and DP, each compared step by step with one rank, is tests/e2e/test_parallel_layouts.py
(the mHC model: it runs the same CPU-mode code paths); exact resumes in the same layout are there
and in tests/e2e/test_run_safety.py.

Megatron logs the first iteration of a process without resetting its loss accumulator
(``training.py:2594``), so the second logged value of every process is the mean of its first
two iterations. Comparisons use the first logged iteration of a run and the ones after its second.

Each torchrun launch gets a free port, a hard timeout and its own process group, which is killed
as a whole on timeout or failure: when one gloo rank dies the others wait forever.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launching import CPU_LOCAL_FLAGS, launch
from tests.launching import losses as _losses

REPO_ROOT = Path(__file__).resolve().parents[2]
# The launcher itself, with the residual variant: a stock GPTModel through the same pretrain().
DRIVER = REPO_ROOT / "pretrain_mhc.py"
LAUNCH_TIMEOUT_S = 240

# CPU mode itself is tested here on Megatron's plain GPT (the residual variant); --cpu implies
# the local modules and no GPU fusions (mhc_megatron/training/cpu_settings.py).
CPU_FLAGS = [*CPU_LOCAL_FLAGS, "--mhc-variant", "residual"]
MODEL = [
    "--num-layers", "2",
    "--hidden-size", "64",
    "--num-attention-heads", "4",
    "--seq-length", "64",
    "--max-position-embeddings", "64",
    "--micro-batch-size", "2",
    "--global-batch-size", "4",
]  # fmt: skip
MOE = ["--num-experts", "4", "--moe-router-topk", "2"]
TRAINING = [
    "--mock-data",
    "--tokenizer-type", "NullTokenizer",
    "--lr", "1e-3",
    "--min-lr", "1e-4",
    "--lr-decay-style", "cosine",
    "--log-interval", "1",
    "--eval-interval", "1000",
    "--eval-iters", "1",
    "--num-workers", "0",
    "--seed", "1234",
]  # fmt: skip
# The DP2 run: weights built whole on the CPU (--use-cpu-initialization) and a vocabulary padded
# to 256. Dropout stays on (Megatron's default 0.1): the resume must restore its RNG state too.
DP2_MODEL = [
    "--vocab-size", "256",
    "--make-vocab-size-divisible-by", "128",
    "--use-cpu-initialization",
]  # fmt: skip


def _launch(nproc: int, args: list[str], log: Path) -> str:
    """Run the driver under torchrun; return its output, or fail the test with its tail."""
    rc, text = launch(DRIVER, nproc, args, log, timeout_s=LAUNCH_TIMEOUT_S)
    if rc != 0:
        what = f"timed out after {LAUNCH_TIMEOUT_S} s" if rc is None else f"exited with {rc}"
        pytest.fail(f"torchrun (nproc {nproc}) {what}; log {log}:\n{text[-6000:]}")
    return text


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """nproc 1: 6 iterations with TensorBoard, a torch_dist checkpoint at 4 (and 6, at the end)."""
    work = tmp_path_factory.mktemp("cpu_nproc1")
    args = [
        *CPU_FLAGS, *MODEL, *MOE, *TRAINING,
        "--vocab-size", "257",
        "--moe-token-dispatcher-type", "alltoall",
        "--train-iters", "6",
        "--save", str(work / "ckpt"),
        "--save-interval", "4",
        "--ckpt-format", "torch_dist",
        "--tensorboard-dir", str(work / "tb"),
    ]  # fmt: skip
    text = _launch(1, args, work / "save.log")
    return work, args, text


def test_nproc1_trains_saves_and_logs(saved_run):
    work, _, text = saved_run
    losses = _losses(text)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6], text[-3000:]
    assert float(losses[6]) < float(losses[1])
    assert "> CPU mode: --distributed-backend nccl replaced by gloo" in text
    assert "successfully saved checkpoint from iteration       4" in text
    assert (work / "ckpt" / "iter_0000004" / "metadata.json").is_file()
    assert "RNG state changed" not in text  # filtered: one generator plays both parts on CPU

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((work / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1
    accumulator = EventAccumulator(str(events[0]))
    accumulator.Reload()
    assert "lm loss" in accumulator.Tags()["scalars"]
    assert [event.step for event in accumulator.Scalars("lm loss")] == [1, 2, 3, 4, 5, 6]


@pytest.fixture(scope="module")
def dp2_distributed_optimizer(tmp_path_factory):
    """nproc 2: DP2 with the distributed optimizer, dropout on; checkpoint at 2, then resumed
    from it."""
    work = tmp_path_factory.mktemp("cpu_dp2_distopt")
    args = [
        *CPU_FLAGS, *MODEL, *MOE, *TRAINING, *DP2_MODEL,
        "--moe-token-dispatcher-type", "alltoall",
        "--use-distributed-optimizer",
        "--train-iters", "6",
        "--ckpt-format", "torch_dist",
    ]  # fmt: skip
    saved = _launch(
        2, [*args, "--save", str(work / "ckpt"), "--save-interval", "2"], work / "save.log"
    )
    resumed = _launch(
        2, [*args, "--load", str(work / "ckpt"), "--ckpt-step", "2"], work / "resume.log"
    )
    return saved, resumed


def test_dp2_distributed_optimizer_saves_and_resumes(dp2_distributed_optimizer):
    """The default distributed-optimizer format, saved and resumed at DP2: the resumed run logs
    the saved run's losses exactly, dropout included (model, optimizer and RNG state restored)."""
    saved, resumed = dp2_distributed_optimizer
    assert "Storing distributed optimizer sharded state of type dp_reshardable" in saved
    assert "successfully loaded checkpoint from" in resumed and "at iteration 2" in resumed
    saved_losses, resumed_losses = _losses(saved), _losses(resumed)
    assert sorted(saved_losses) == [1, 2, 3, 4, 5, 6], saved[-3000:]
    assert sorted(resumed_losses) == [3, 4, 5, 6], resumed[-3000:]
    # Iteration 3 is the first of the resumed process; 5 and 6 follow a reset accumulator.
    for iteration in (3, 5, 6):
        assert resumed_losses[iteration] == saved_losses[iteration], iteration


def test_missing_data_path_fails_early(tmp_path):
    """A --data-path prefix without .bin/.idx is reported before Megatron starts building (the
    check is the same for every --mhc-variant and under torchrun)."""
    prefix = tmp_path / "corpus_text_document"
    args = [*CPU_FLAGS, *MODEL, *TRAINING, "--vocab-size", "257", "--train-iters", "1"]
    args = [a for a in args if a != "--mock-data"] + ["--data-path", str(prefix)]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, str(DRIVER), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=LAUNCH_TIMEOUT_S,
        start_new_session=True,
    )
    assert proc.returncode != 0
    assert f"{prefix}.bin" in proc.stderr and f"{prefix}.idx" in proc.stderr
    assert "Error" in proc.stderr and "--mock-data" in proc.stderr
    assert "initializing torch distributed" not in proc.stdout
    assert "iteration        1/" not in proc.stdout + proc.stderr


CUDA_REQUESTS_SCRIPT = """
import os, torch
from mhc_megatron.training import cpu
cpu.enable_cpu_mode()
n_patches = len(cpu._patched)
cpu.enable_cpu_mode()  # idempotent
assert len(cpu._patched) == n_patches
assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
assert not torch.cuda.is_available() and torch.cuda.device_count() == 0
devices = [
    torch.zeros(2, device="cuda").device,
    torch.empty(2, device=torch.device("cuda", torch.cuda.current_device())).device,
    torch.ones(2).cuda().device,
    torch.ones(2).to("cuda:0").device,
    torch.ones(2).to(device="cuda").device,
    torch.nn.Linear(2, 2).cuda().weight.device,
]
assert all(d.type == "cpu" for d in devices), devices
torch.cuda.synchronize()
stream = torch.cuda.Stream()
with torch.cuda.stream(stream):
    stream.wait_stream(torch.cuda.current_stream())
stream.record_event().synchronize()
print("OK")
"""


def test_cpu_mode_maps_cuda_requests_to_cpu():
    """In CPU mode, CUDA device requests land on the CPU and CUDA reports no device."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", CUDA_REQUESTS_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=LAUNCH_TIMEOUT_S,
        start_new_session=True,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def test_enable_cpu_mode_refuses_other_megatron_core_versions(monkeypatch):
    from mhc_megatron.training import cpu

    monkeypatch.setattr(cpu, "_enabled", False)  # this process may run in CPU mode already
    monkeypatch.setattr(cpu, "_patched", [])
    monkeypatch.setattr(cpu, "_installed_megatron_core_version", lambda: "0.20.0")
    with pytest.raises(RuntimeError, match=r"0\.19\.2") as excinfo:
        cpu.enable_cpu_mode()
    assert "0.20.0" in str(excinfo.value)
    assert not cpu.is_cpu_mode_enabled() and cpu._patched == []


def test_enable_cpu_mode_refuses_once_cuda_is_initialized(monkeypatch):
    import torch

    from mhc_megatron.training import cpu

    monkeypatch.setattr(cpu, "_enabled", False)  # this process may run in CPU mode already
    monkeypatch.setattr(cpu, "_patched", [])
    monkeypatch.setattr(cpu, "_installed_megatron_core_version", lambda: "0.19.2")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="before anything uses CUDA"):
        cpu.enable_cpu_mode()
    assert not cpu.is_cpu_mode_enabled() and cpu._patched == []
