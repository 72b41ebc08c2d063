"""The Docker image built and run for real, with podman, against a local stand-in base.

NVIDIA's registry is out of reach here, so ``examples/docker/standin_base.sh`` makes a stand-in for
its PyTorch container (Debian, Python 3.13, torch 2.13.0 and triton 3.7.1 from PyPI; kept
between runs under its tag). The project's Dockerfile is built against it unmodified
(``--build-arg BASE_IMAGE``), and the image's default command, the tiny example, runs as the
image's non-root user with no network, writing to a mounted volume: the checkpoint, TensorBoard
events and log must be there, owned by that user, and a second run must resume and extend it.
The project image is removed afterwards; the containers run with ``--rm``. Marked slow in
conftest.py.

Needs root, podman, runc and mmdebstrap (``.ci/run`` installs them), and network for the two
builds. Without them the tests skip and say which is missing. Measured on a 2-core machine:
about 1 minute with the base cached, 4.5 minutes building it.
"""

import os
import re
import shutil
import subprocess

import pytest

from tests.launching import REPO_ROOT

PODMAN = shutil.which("podman")
STANDIN = REPO_ROOT / "examples" / "docker" / "standin_base.sh"
IMAGE_UID = 1000  # the Dockerfile's USER_UID default
BUILD_TIMEOUT_S = 1500


def _missing() -> str | None:
    if PODMAN is None:
        return "no container engine: podman is not installed (.ci/run installs podman and runc)"
    if shutil.which("mmdebstrap") is None:
        return "mmdebstrap is not installed (it makes the stand-in base; .ci/run installs it)"
    if os.geteuid() != 0:
        return "rootful podman is needed (the stand-in base and the volume's owner need root)"
    return None


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The environment podman runs in: runc, and default ulimits the host allows."""
    if reason := _missing():
        pytest.skip(reason)
    import resource

    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    # crun refuses cgroups v1 hybrid mode; podman's default ulimits exceed what the host allows.
    conf.write_text(
        f'[containers]\ndefault_ulimits = ["nofile={nofile}:{nofile}", "nproc=32768:32768"]\n'
        '[engine]\nruntime = "runc"\n'
    )
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    info = subprocess.run([PODMAN, "info"], env=env, capture_output=True, text=True)
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: {info.stderr.strip()[-500:]}")
    return env


@pytest.fixture(scope="module")
def image(engine):
    """The project's image, built against the stand-in base; removed after the module."""
    base = subprocess.run(
        [str(STANDIN)], env=engine, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
    )
    assert base.returncode == 0, base.stderr[-4000:]
    tag = f"localhost/mhc-megatron-test:{os.getpid()}"
    build = subprocess.run(
        [PODMAN, "build", "--format", "docker", "--network", "host",
         "--build-arg", f"BASE_IMAGE={base.stdout.strip()}", "-t", tag, str(REPO_ROOT)],
        env=engine, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
    )  # fmt: skip
    try:
        assert build.returncode == 0, (build.stdout + build.stderr)[-6000:]
        yield tag
    finally:
        subprocess.run([PODMAN, "rmi", "-f", tag], env=engine, capture_output=True)


def _run(engine, image, volume, *command, **env):
    args = [PODMAN, "run", "--rm", "--network", "none", "-v", f"{volume}:/out"]
    for name, value in env.items():
        args += ["-e", f"{name}={value}"]
    proc = subprocess.run(
        [*args, image, *command], env=engine, capture_output=True, text=True, timeout=900
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_default_command_trains_as_the_image_user_and_a_second_run_resumes(engine, image, tmp_path):
    volume = tmp_path / "volume"
    volume.mkdir()
    os.chown(volume, IMAGE_UID, IMAGE_UID)

    rc, who = _run(engine, image, volume, "id", "-u")
    assert rc == 0 and who.strip() == str(IMAGE_UID), who

    # The default command (CMD: examples/tiny/train.sh), 3 steps.
    rc, text = _run(engine, image, volume, OUT_DIR="/out/tiny", TRAIN_ITERS="3")
    assert rc == 0, text[-4000:]
    out = volume / "tiny"
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert (checkpoints / "iter_0000003" / ".metadata").is_file()  # torch_dist
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    (log,) = (out / "logs").glob("train-*.log")
    assert text.rstrip().splitlines()[-1] == (
        "> run ended: checkpoints in /out/tiny/checkpoints (latest: iteration 3); "
        f"TensorBoard events in /out/tiny/tensorboard; log in /out/tiny/logs/{log.name}"
    )
    assert all(p.stat().st_uid == IMAGE_UID for p in out.rglob("*"))

    # Again, 5 steps: it resumes at 3 (extending a finished run needs the scheduler override).
    rc, text = _run(
        engine, image, volume, "examples/tiny/train.sh", "--override-opt-param-scheduler",
        "--log-interval", "1", OUT_DIR="/out/tiny", TRAIN_ITERS="5",
    )  # fmt: skip
    assert rc == 0, text[-4000:]
    assert "successfully loaded checkpoint from /out/tiny/checkpoints" in text
    iterations = [int(i) for i in re.findall(r"iteration\s+(\d+)/\s*5 \|", text)]
    assert iterations and min(iterations) == 4 and max(iterations) == 5, iterations
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
