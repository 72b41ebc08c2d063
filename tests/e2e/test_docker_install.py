"""Static checks of the Dockerfile's dependency install (no container engine; under a second).

The image installs requirements.txt less the packages NVIDIA's base image provides
(``CONTAINER_PROVIDED``: its torch and triton, which its TransformerEngine and apex are built
against), with the same pins and under a pip constraint, then the project with ``--no-deps``.
The filtering RUN is run here, in the Dockerfile's shell, on requirements.txt; the pip commands
are read from the RUNs. tests/e2e/test_docker_image.py's real build cannot show most of this: its
stand-in base has PyPI's torch 2.13.0 and triton 3.7.1, the very pins of requirements.txt, so
installing them again, or without the constraint, changes nothing there.

Each check returns the problems it finds; ``test_check_catches_mutation`` feeds it a broken copy,
to show that it can fail.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from tests.e2e.dockerfile import DOCKERFILE, REQUIREMENTS, Dockerfile, append, pip_installs, replace

# What the base image provides and the install leaves out (the Dockerfile's ARG
# CONTAINER_PROVIDED). Installing requirements.txt's torch==... would replace NVIDIA's build.
CONTAINER_PROVIDED = frozenset({"torch", "triton"})
FILTERED = "requirements.container.txt"


def read_requirements(text: str) -> tuple[dict[str, str], list[str]]:
    """Requirement lines as {canonical name: pin and markers}, and the lines that are not
    requirements (``-r``, ``-c``, options)."""
    parsed, other = {}, []
    for line in text.splitlines():
        line = re.sub(r"(^|\s)#.*", "", line).strip()
        if not line:
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            other.append(line)
            continue
        parsed[canonicalize_name(req.name)] = str(req).split(req.name, 1)[1].strip()
    return parsed, other


def run_filter(df: Dockerfile, requirements: str, tmp: Path) -> str | None:
    """Runs the one RUN that writes ``FILTERED`` on a requirements.txt, in the Dockerfile's SHELL
    with its ARG and ENV values, as the build would; returns what it wrote (None: no such RUN)."""
    runs = [ins for ins in df.find("RUN") if re.search(r">\s*" + re.escape(FILTERED), ins.value)]
    if len(runs) != 1:
        return None
    shells = df.find("SHELL")
    shell = (shells[-1].exec_form() if shells else None) or ["/bin/sh", "-c"]
    (tmp / "requirements.txt").write_text(requirements)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **runs[0].args, **runs[0].envs}
    result = subprocess.run(
        [*shell, runs[0].value], cwd=tmp, env=env, capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        raise RuntimeError(f"the requirements filter failed: {result.stderr}")
    return (tmp / FILTERED).read_text()


def check_filter(df: Dockerfile, requirements: str, tmp: Path) -> list[str]:
    """ARG CONTAINER_PROVIDED is the documented set, and the filtering RUN keeps every other
    requirement of requirements.txt, with its pin, and none of those."""
    ends = [ins for ins in df.stage if "CONTAINER_PROVIDED" in ins.args]
    declared = ends[-1].args["CONTAINER_PROVIDED"].split() if ends else []
    problems = []
    if {canonicalize_name(n) for n in declared} != CONTAINER_PROVIDED:
        problems.append(f"ARG CONTAINER_PROVIDED is {declared}, not {sorted(CONTAINER_PROVIDED)}")
    wanted, other = read_requirements(requirements)
    if other:  # -r/-c lines name files the Dockerfile does not copy
        problems.append(f"requirements.txt lines the image cannot follow: {other}")
    wanted = {n: pin for n, pin in wanted.items() if n not in CONTAINER_PROVIDED}
    filtered = run_filter(df, requirements, tmp)
    if filtered is None:
        return [*problems, f"no single RUN writes {FILTERED}"]
    got, _ = read_requirements(filtered)
    problems += [f"{n}{wanted[n]} is not installed" for n in sorted(wanted.keys() - got.keys())]
    problems += [f"{n} is installed but not wanted" for n in sorted(got.keys() - wanted.keys())]
    problems += [
        f"{n}: installed {got[n]}, requirements.txt {wanted[n]}"
        for n in sorted(wanted.keys() & got.keys())
        if wanted[n] != got[n]
    ]
    return problems


def check_pip_commands(df: Dockerfile) -> list[str]:
    """pip installs ``FILTERED`` under a constraint and no other requirements file, then the
    project with ``--no-deps``, and never torch or triton by name."""
    problems = []
    requirements_at = project_at = None
    for ins in df.find("RUN"):
        for command in pip_installs(ins.value):
            args = command.split()
            if re.search(r"-r\s+" + re.escape(FILTERED) + r"\b", command):
                requirements_at = df.index(ins)
                constrained = "PIP_CONSTRAINT=" in command or {"-c", "--constraint"} & set(args)
                if not (constrained or "PIP_CONSTRAINT" in ins.envs):
                    problems.append(f"line {ins.line}: requirements installed without constraint")
            elif "-r" in args or "--requirement" in args:
                problems.append(f"line {ins.line}: pip installs an unfiltered file: {command}")
            elif "-e" in args or "." in args:
                project_at = df.index(ins)
                if "--no-deps" not in args:
                    problems.append(f"line {ins.line}: the project is installed with its deps")
            for token in args[args.index("install") + 1 :]:
                name = re.split(r"[\[=<>!~;@]", token.strip("'\""), maxsplit=1)[0]
                if not token.startswith("-") and canonicalize_name(name) in CONTAINER_PROVIDED:
                    problems.append(f"line {ins.line}: pip installs {token}")
    if requirements_at is None:
        problems.append(f"no RUN runs pip install -r {FILTERED}")
    if project_at is None:
        problems.append("no RUN installs the project (pip install --no-deps -e .)")
    elif requirements_at is not None and project_at < requirements_at:
        problems.append("the project is installed before its requirements")
    return problems


def _run_checks(dockerfile: str, requirements: str, tmp: Path) -> list[str]:
    df = Dockerfile.parse(dockerfile)
    return check_filter(df, requirements, tmp) + check_pip_commands(df)


def test_install_checks_pass(tmp_path):
    """The checks find nothing wrong with the repository's Dockerfile and requirements.txt."""
    assert _run_checks(DOCKERFILE.read_text(), REQUIREMENTS.read_text(), tmp_path) == []


def test_install_follows_requirements_txt(tmp_path):
    """A dependency added to requirements.txt reaches the image, with its pin; any spelling of
    torch or triton stays out, and names that merely start like them stay in."""
    requirements = REQUIREMENTS.read_text() + (
        "newdep==1.2.3\n"
        "torchvision==0.29.0 ; sys_platform == 'linux'\n"
        "triton-kernels>=0.1\n"
        "Torch>=2.0  # another spelling\n"
        "  TRITON @ https://example.invalid/triton.whl\n"
    )
    assert _run_checks(DOCKERFILE.read_text(), requirements, tmp_path) == []
    kept, _ = read_requirements((tmp_path / FILTERED).read_text())
    assert {"newdep", "torchvision", "triton-kernels"} <= kept.keys()
    assert not CONTAINER_PROVIDED & kept.keys()


FILTER_TAIL = '(${names})([^A-Za-z0-9._-]|$)" requirements.txt \\\n        > '
# name: how to break the Dockerfile. Each must make the checks report a problem.
MUTATIONS = {
    "exclusion added": replace('"torch triton"', '"torch einops"'),
    "torch not excluded": replace('"torch triton"', '"triton"'),
    "filter drops einops": replace("(${names})(", "(${names}|einops)("),
    "filter changes pins": replace(
        FILTER_TAIL, FILTER_TAIL.replace("requirements.txt", "requirements.txt | sed s/==/~=/")
    ),
    "no filtering RUN": replace(f"> {FILTERED}", "> /dev/null"),
    "unfiltered install": replace(f"-r {FILTERED}", "-r requirements.txt"),
    "no constraint": replace("PIP_CONSTRAINT=/etc/pip/mhc-constraint.txt \\", "\\"),
    "project with deps": replace("--no-deps -e .", "-e ."),
    "torch installed": append("RUN pip install --no-deps torch\n"),
    "triton pinned": append("RUN python -m pip install 'triton==3.7.0'\n"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_check_catches_mutation(mutation, tmp_path):
    """The checks report a problem on a copy of the Dockerfile broken in the way they guard
    against."""
    dockerfile = MUTATIONS[mutation](DOCKERFILE.read_text())
    try:
        problems = _run_checks(dockerfile, REQUIREMENTS.read_text(), tmp_path)
    except RuntimeError as error:  # the filter itself failed: caught too
        problems = [str(error)]
    assert problems, f"the install checks missed {mutation!r}"


def test_requirements_with_include_line_is_reported(tmp_path):
    """A ``-r``/``-c`` line in requirements.txt, which the image cannot follow, is reported."""
    requirements = REQUIREMENTS.read_text() + "-r extra.txt\n"
    assert _run_checks(DOCKERFILE.read_text(), requirements, tmp_path)
