"""SLURM for real: ``examples/slurm/train.sbatch`` on a local cluster of two fake nodes.

``tools/local_slurm.py`` starts munged, slurmctld and two slurmd (nodes n1, n2) on this machine;
the tests submit the project's own sbatch script with ``sbatch --wait`` and train the tiny recipe
on CPU, one rank per node. Select them with ``-k slurm``. They skip, saying why, only where the
SLURM packages cannot be installed or the cluster cannot start (not root, no apt-get).
"""

import importlib.util
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.launching import REPO_ROOT, losses

SBATCH = REPO_ROOT / "examples" / "slurm" / "train.sbatch"
# Few steps, every one logged, no evaluation; the tiny recipe's 10 warmup steps must stay below
# --train-iters.
TRAIN_ARGS = ["--lr-warmup-iters", "1", "--eval-iters", "0", "--log-interval", "1"]
# sbatch options of a CPU job on the fake nodes: they have no GPUs (the script asks for 8).
CPU_JOB = ["--nodes", "2", "--ntasks-per-node", "1", "--gpus-per-node", "0"]
JOB_TIMEOUT_S = 150  # hard limit on each `sbatch --wait` (a run takes ~30 s, a requeued one ~65 s)


def _load_local_slurm():
    spec = importlib.util.spec_from_file_location("local_slurm", REPO_ROOT / "tools/local_slurm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


local_slurm = _load_local_slurm()


def _require_slurm() -> None:
    """Installs the packages where possible; skips with the reason where not."""
    reason = local_slurm.unavailable_reason()
    if reason and "not installed" in reason:
        reason = local_slurm.install()
    if reason:
        pytest.skip(reason)


def _start(directory: Path, nodes: int):
    try:
        return local_slurm.LocalSlurm(directory, nodes=nodes).start()
    except RuntimeError as error:
        pytest.skip(f"the local SLURM cluster did not start: {error}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two fake nodes, n1 and n2, stopped at the end whatever happened."""
    _require_slurm()
    slurm = _start(tmp_path_factory.mktemp("slurm"), nodes=2)
    try:
        yield slurm
    finally:
        slurm.stop()


def _submit(slurm, out_dir: Path, log: Path, args: list[str]) -> tuple[subprocess.Popen, str]:
    """``sbatch --wait`` of train.sbatch in the background; returns the process and the job id."""
    env = slurm.env()
    env.pop("TRITON_INTERPRET", None)  # set by conftest.py for the kernel tests only
    env["OUT_DIR"] = str(out_dir)
    cmd = [
        "sbatch", "--wait", "--parsable", *CPU_JOB, "--job-name", "test-slurm",
        f"--output={log}", str(SBATCH), "--cpu", "tiny", *TRAIN_ARGS, *args,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    job_id = proc.stdout.readline().strip()  # --parsable prints the id at submission
    if not job_id.isdigit():
        proc.kill()
        pytest.fail(f"sbatch did not submit: {job_id!r} {proc.communicate()[1]}")
    return proc, job_id


def _finish(slurm, proc: subprocess.Popen, job_id: str, log: Path) -> tuple[int, str]:
    """Waits for ``sbatch --wait``; on timeout cancels the job and fails the test."""
    try:
        rc = proc.wait(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        slurm.run("scancel", "--full", job_id, check=False)
        proc.kill()
        proc.wait()
        pytest.fail(f"job {job_id} ran past {JOB_TIMEOUT_S} s:\n{_tail(log)}")
    return rc, log.read_text(errors="replace")


def _tail(log: Path, lines: int = 60) -> str:
    text = log.read_text(errors="replace") if log.exists() else "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _signal_masks(pid: int) -> tuple[int, int]:
    """``(ignored, caught)`` signal bit masks of a process (bit ``signum - 1``)."""
    status = Path(f"/proc/{pid}/status").read_text()
    ign = int(re.search(r"^SigIgn:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    cgt = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    return ign, cgt


def _torchruns_and_ranks(out_dir: Path) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """The job's torchrun processes (one per node) and their ranks, found by the job's OUT_DIR."""
    torchruns = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "torch.distributed.run" in (proc.info["cmdline"] or []) and (
                proc.environ().get("OUT_DIR") == str(out_dir)
            ):
                torchruns.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    ranks = [
        child
        for torchrun in torchruns
        for child in torchrun.children()
        if any(arg.endswith("pretrain_mhc.py") for arg in child.cmdline())
    ]
    return torchruns, ranks


def test_slurm_local_cluster_stops_what_it_started(tmp_path):
    """stop() leaves no daemon and no job process behind, and kills nothing else."""
    _require_slurm()
    bystander = subprocess.Popen(["sleep", "300"])  # not the cluster's: must survive stop()
    slurm = _start(tmp_path / "cluster", nodes=1)
    try:
        daemons = [
            local_slurm._read_pid(p) for p in sorted((slurm.dir / "run").glob("*.pid"))
        ]  # munged, slurmctld, slurmd-n1
        assert len(daemons) == 3 and all(daemons)
        job = slurm.run("sbatch", "--parsable", "-o", "/dev/null", "--wrap", "sleep 301").strip()
        deadline = time.monotonic() + 20
        sleeper = []
        while not sleeper and time.monotonic() < deadline:
            sleeper = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == [
                "sleep", "301"]]  # fmt: skip
            time.sleep(0.2)
        assert sleeper, f"job {job} did not start:\n{slurm.log_tails()}"
    finally:
        slurm.stop()
    assert not [p for p in daemons if local_slurm._alive(p)]
    assert not sleeper[0].is_running() or sleeper[0].status() == psutil.STATUS_ZOMBIE
    assert bystander.poll() is None
    bystander.kill()
    bystander.wait()


def test_slurm_usr1_saves_requeues_and_resumes(cluster, tmp_path):
    """Two nodes, one rank each, train as one world; B:USR1 (what --signal=B:USR1@600 sends
    before the time limit) makes both ranks save at the next step and exit; the job requeues
    itself, resumes from that step and finishes, saving a shard per rank each time."""
    # The signal goes out at iteration 3 and lands a few iterations later (measured: at 5, with
    # steps of ~0.3 s under load); 24 leaves room for a slow path and a real resumed stretch.
    train_iters = 24
    out_dir, log = tmp_path / "run", tmp_path / "job.log"
    proc, job_id = _submit(
        cluster, out_dir, log, ["--train-iters", str(train_iters), "--save-interval", "1000"]
    )
    try:
        deadline = time.monotonic() + 90
        while len(losses(log.read_text(errors="replace") if log.exists() else "")) < 3:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"job {job_id} did not reach iteration 3:\n{_tail(log)}")
            time.sleep(0.2)
        # The route of the signal: torchrun ignores SIGTERM (else it would SIGKILL the ranks
        # 30 s after forwarding it) and every rank catches it (Megatron's handler).
        torchruns, ranks = _torchruns_and_ranks(out_dir)
        assert len(torchruns) == 2 and len(ranks) == 2, (torchruns, ranks)
        term = 1 << (signal.SIGTERM - 1)
        for torchrun in torchruns:
            ignored, caught = _signal_masks(torchrun.pid)
            assert ignored & term and not caught & term
        for rank in ranks:
            assert _signal_masks(rank.pid)[1] & term
        cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    except BaseException:
        cluster.run("scancel", "--full", job_id, check=False)
        proc.kill()
        proc.wait()
        raise
    rc, text = _finish(cluster, proc, job_id, log)
    assert rc == 0, _tail(log)

    first, restart, second = text.partition(f"job {job_id} (restart 1)")
    assert restart, f"job {job_id} was not requeued:\n{_tail(log)}"
    assert "(restart 2)" not in second
    saved = re.findall(r"saving checkpoint at iteration\s+(\d+)", first)
    assert len(saved) == 1, saved
    k = int(saved[0])
    assert 3 <= k < train_iters
    # One task per node, and torchrun's c10d rendezvous on n1 joined them into one world.
    assert "node n1: node rank 0 of 2, rendezvous n1:" in first
    assert "node n2: node rank 1 of 2, rendezvous n1:" in first
    assert "using world size: 2, data-parallel size: 2" in first
    assert "batch script got SIGUSR1" in first
    assert "exiting program after receiving SIGTERM" in first
    assert max(losses(first)) == k  # it stopped right after the save
    # The ranks and torchrun ended normally (a torchrun that forwards SIGTERM exits 143).
    assert f"step exited with 0; checkpoint at iteration {k} (was 0)" in first
    assert f"requeueing job {job_id}: the next run resumes from iteration {k}\n" in first

    assert re.search(rf"successfully loaded checkpoint from \S+ .* at iteration {k}\n", second)
    resumed = sorted(losses(second))
    assert resumed == list(range(k + 1, train_iters + 1))
    assert "training finished" in second
    checkpoints = out_dir / "checkpoints"
    latest = (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip()
    assert latest == str(train_iters)
    for iteration in (k, train_iters):  # torch_dist writes one shard per rank: both saved
        shards = sorted(p.name for p in (checkpoints / f"iter_{iteration:07d}").glob("*.distcp"))
        assert shards == ["__0_0.distcp", "__1_0.distcp"], iteration
