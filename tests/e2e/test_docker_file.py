"""Static checks of the Dockerfile and examples/docker's scripts (no container engine; well under a
second).

tests/e2e/test_docker_image.py builds the image for real, against a stand-in base since NVIDIA's
registry is out of reach, and runs its default command. What that build cannot show is checked
here: the NGC base image and its Python, the run-time ENV and the absence of secrets, the user's
fixed UID and ownership, the exec form of CMD. The rest (every COPY source exists, the default
command is an executable file of the project, every RUN parses) the build shows too, but minutes
later and only where podman runs as root, so it is checked here as well.

Each check returns the problems it finds; ``test_check_catches_mutation`` feeds it a broken copy of
the Dockerfile, to show that it can fail. The Dockerfile is parsed with dockerfile-parse
(tests/e2e/dockerfile.py).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable

import pytest

from tests.e2e.dockerfile import (
    DOCKERFILE,
    DOCKERIGNORE,
    ROOT,
    Dockerfile,
    append,
    excluded,
    ignore_patterns,
    pip_installs,
    replace,
)

NGC_PYTORCH = "nvcr.io/nvidia/pytorch"
# Python of NVIDIA's PyTorch container by release (tag YY.MM-py3), with where each was read.
# Add a row, with its source, before moving the Dockerfile to another release.
NGC_PYTHON = {
    "24.10": (3, 10),  # lablup/backend.ai-kernels PR #311 ("NGC PyTorch 24.10 - Python 3.10")
    "25.01": (3, 12),  # lablup/backend.ai-kernels PR #306 ("NGC PyTorch 25.01 - Python 3.12")
    "25.09": (3, 12),  # lablup/backend.ai-kernels PR #320 ("ngc-pytorch:25.09 ... python 3.12")
    # NVIDIA's release notes rel-25-12: torch in /usr/local/lib/python3.12/dist-packages.
    "25.12": (3, 12),
    # A third-party benchmark record (Prime Flash MoE on a B200, 2026-08-26) made in
    # nvcr.io/nvidia/pytorch:26.07-py3: "Python 3.12.3", torch 2.13.0a0+9186a08b2c.nv26.07,
    # CUDA 13.3. NVIDIA's own 26.07 release notes were not at hand.
    "26.07": (3, 12),
}
MIN_PYTHON = (3, 12)  # megatron-core 0.19.2
RUN_ENV = {"PYTHONUNBUFFERED": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
SECRET = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|CREDENTIAL", re.I)
SCRIPTS = sorted((ROOT / "examples" / "docker").glob("*.sh"))


def check_base_image(df: Dockerfile) -> list[str]:
    """The base is NVIDIA's PyTorch container at a pinned YY.MM-py3 release with Python >= 3.12
    (optionally also pinned by digest)."""
    pattern = re.escape(NGC_PYTORCH) + r":(\d{2}\.\d{2})-py3(@sha256:[0-9a-f]{64})?"
    match = re.fullmatch(pattern, df.base or "")
    if match is None:
        return [f"base {df.base} is not {NGC_PYTORCH}:YY.MM-py3 (TransformerEngine, apex)"]
    release = match.group(1)
    if release not in NGC_PYTHON:
        return [f"release {release}: add its Python, with a source, to NGC_PYTHON"]
    if NGC_PYTHON[release] < MIN_PYTHON:
        return [f"release {release} has Python {NGC_PYTHON[release]}, needs {MIN_PYTHON}"]
    return []


def check_copy_sources(df: Dockerfile) -> list[str]:
    """Every COPY/ADD source is a path of the repository (not a URL, not missing)."""
    problems = []
    for ins in df.find("COPY") + df.find("ADD"):
        words = ins.words()
        if any(w.startswith("--from") for w in words):
            continue  # another stage or image, not the build context
        for source in [w for w in words if not w.startswith("--")][:-1]:
            if "://" in source:
                problems.append(f"line {ins.line}: {source} is fetched at build time")
            elif source not in (".", "./") and not list(ROOT.glob(source)):
                problems.append(f"line {ins.line}: {source} does not exist")
    return problems


def check_user(df: Dockerfile) -> list[str]:
    """A non-root user, created with a fixed non-zero UID, owns the copied project and is set
    after every pip install."""
    users = df.find("USER")
    if not users:
        return ["no USER: the container runs as root"]
    user = users[-1].expanded().split(":")[0]
    if user in ("", "root", "0"):
        return [f"the final USER is {user or 'empty'}"]
    problems = []
    last = df.index(users[-1])
    useradd = re.compile(r"\buseradd\s[^&;|]*--uid[\s=](\d+)\s[^&;|]*\b" + re.escape(user) + r"\b")
    uids = [
        int(m.group(1))
        for ins in df.find("RUN")
        if df.index(ins) < last and (m := useradd.search(ins.expanded()))
    ]
    if not uids or 0 in uids:
        problems.append(f"user {user} is not created with a fixed non-zero UID (useradd --uid)")
    for ins in df.find("RUN"):
        if df.index(ins) > last and pip_installs(ins.value):
            problems.append(f"line {ins.line}: pip install after USER {user}")
    for ins in df.find("COPY"):
        words = ins.words()
        if [w for w in words if not w.startswith("--")][:1] == ["."]:
            owners = [w.split("=", 1)[1].split(":")[0] for w in words if w.startswith("--chown=")]
            if owners != [user]:
                problems.append(f"line {ins.line}: the project is copied without --chown={user}")
    return problems


def check_command(df: Dockerfile, dockerignore: str) -> list[str]:
    """CMD (and any ENTRYPOINT) is in exec form, so that signals reach the program, and its
    program is an executable file of the project that the build context keeps."""
    problems = []
    for keyword in ("ENTRYPOINT", "CMD"):
        found = df.find(keyword)
        if found and found[-1].exec_form() is None:
            problems.append(f"{keyword} is in shell form (signals would go to /bin/sh)")
    cmds = df.find("CMD")
    if not cmds:
        return [*problems, "no CMD"]
    program = (cmds[-1].exec_form() or [""])[0]
    if not program:
        return [*problems, "CMD names no program"]
    workdirs = df.find("WORKDIR")
    workdir = workdirs[-1].expanded().rstrip("/") if workdirs else ""
    relative = program.removeprefix(workdir + "/") if program.startswith("/") else program
    if relative.startswith("/") or "/" not in relative:
        problems.append(f"{program} is not a file of the project (in {workdir})")
    elif not (ROOT / relative).is_file():
        problems.append(f"{program} does not exist in the repository")
    elif not os.access(ROOT / relative, os.X_OK):
        problems.append(f"{program} is not executable")
    elif excluded(relative, ignore_patterns(dockerignore)):
        problems.append(f".dockerignore excludes {program}")
    return problems


def check_environment(df: Dockerfile) -> list[str]:
    """The run-time ENV Megatron wants is set, and no ARG or ENV name looks like a secret."""
    envs = df.stage[-1].envs if df.stage else {}
    problems = [f"ENV {k}={v} is missing" for k, v in RUN_ENV.items() if envs.get(k) != v]
    for ins in df.stage:
        names = {**ins.args, **ins.envs}
        problems += [f"{name} looks like a secret" for name in names if SECRET.search(name)]
    return sorted(set(problems))


def check_run_syntax(df: Dockerfile) -> list[str]:
    """Every shell-form RUN parses in the Dockerfile's SHELL (``-n``: read, not run), so that a
    quoting slip shows here rather than minutes into a build."""
    shells = df.find("SHELL")
    shell = (shells[-1].exec_form() if shells else None) or ["/bin/sh", "-c"]
    problems = []
    for ins in df.find("RUN"):
        if ins.exec_form() is None:
            cmd = [shell[0], "-n", *shell[1:], ins.value]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            if result.returncode != 0:
                problems.append(f"line {ins.line}: {result.stderr.strip()}")
    return problems


CHECKS: dict[str, Callable[[Dockerfile, str], list[str]]] = {
    "base": lambda df, _: check_base_image(df),
    "copy": lambda df, _: check_copy_sources(df),
    "user": lambda df, _: check_user(df),
    "command": check_command,
    "environment": lambda df, _: check_environment(df),
    "syntax": lambda df, _: check_run_syntax(df),
}


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_dockerfile_check(check):
    """Each check finds nothing wrong with the repository's Dockerfile."""
    df = Dockerfile.parse(DOCKERFILE.read_text())
    assert CHECKS[check](df, DOCKERIGNORE.read_text()) == []


BASE = "nvcr.io/nvidia/pytorch:26.07-py3"
# name: (check, how to break the Dockerfile). Each must make that check report a problem.
MUTATIONS = {
    "tag latest": ("base", replace(BASE, f"{NGC_PYTORCH}:latest")),
    "no tag": ("base", replace(BASE, NGC_PYTORCH)),
    "python 3.10": ("base", replace(BASE, f"{NGC_PYTORCH}:24.10-py3")),
    "undocumented release": ("base", replace(BASE, f"{NGC_PYTORCH}:30.01-py3")),
    "not NGC": ("base", replace(BASE, "pytorch/pytorch:2.13.0-cuda13.0")),
    "bad digest": ("base", replace(BASE, f"{BASE}@sha256:abc")),
    "missing source": ("copy", replace("COPY requirements.txt", "COPY reqs.txt")),
    "url source": ("copy", append("ADD https://example.invalid/x.tar /x\n")),
    "root user": ("user", replace("USER ${USER_NAME}", "USER root")),
    "no user": ("user", replace("USER ${USER_NAME}", "")),
    "install after user": ("user", append("RUN pip install --user einops\n")),
    "uid not fixed": ("user", replace('--uid "${USER_UID}" ', "")),
    "uid 0": ("user", replace("ARG USER_UID=1000", "ARG USER_UID=0")),
    "not owned": ("user", replace("--chown=${USER_NAME}:${USER_NAME} ", "")),
    "missing command": ("command", replace("examples/tiny/train.sh", "ex/t.sh")),
    "shell form": ("command", replace('["examples/tiny/train.sh"]', "examples/tiny/train.sh")),
    "program from PATH": ("command", replace('["examples/tiny/train.sh"]', '["bash"]')),
    "not executable": ("command", replace("examples/tiny/train.sh", "tools/preprocess_data.py")),
    "no max connections": ("environment", replace(" CUDA_DEVICE_MAX_CONNECTIONS=1\n", " X=1\n")),
    "secret": ("environment", append("ARG HF_TOKEN=hf_abc\n")),
    "unclosed if": ("syntax", replace("; fi \\", " \\")),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_check_catches_mutation(mutation):
    """Each check reports a problem on a copy of the Dockerfile broken in the way it guards
    against."""
    check, mutate = MUTATIONS[mutation]
    df = Dockerfile.parse(mutate(DOCKERFILE.read_text()))
    assert CHECKS[check](df, DOCKERIGNORE.read_text()), f"check {check} missed {mutation!r}"


def test_command_check_sees_dockerignore():
    """A default command that .dockerignore leaves out of the image is reported."""
    df = Dockerfile.parse(DOCKERFILE.read_text())
    assert check_command(df, DOCKERIGNORE.read_text() + "**/*.sh\n")


def test_parse_reads_substitutions_and_continuations():
    """dockerfile-parse, as used here, substitutes a global ARG into FROM and stage ARGs into
    USER, and joins continued lines around comment lines into one RUN."""
    df = Dockerfile.parse(
        "ARG B=img:1\nFROM ${B}\nARG U=me\nRUN echo 1 \\\n# inside\n  && echo 2\nUSER ${U}\n"
    )
    assert df.base == "img:1"
    (run,) = df.find("RUN")
    assert " ".join(run.value.split()) == "echo 1 && echo 2" and run.line == 4
    assert df.find("USER")[0].expanded() == "me"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_helper_script_is_valid_bash(script):
    """examples/docker's scripts are executable and parse (``bash -n``)."""
    assert os.access(script, os.X_OK), f"{script} is not executable"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
