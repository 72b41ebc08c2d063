"""Checks of the Dockerfile and .dockerignore that need no container engine (about a second).

tests/test_docker_image.py builds and runs the image with podman against a stand-in base; NVIDIA's
own base (nvcr.io) is out of reach. What the files alone show is checked here: the Dockerfile is
parsed (line continuations, comments, exec and shell forms, ARG/ENV substitution) and checked:

- the base image is NVIDIA's PyTorch container at a pinned tag whose Python, in ``NGC_PYTHON``
  below, is >= 3.12 (megatron-core 0.19.2 needs it);
- every COPY/ADD source exists and is in the build context, and the context (``.dockerignore``,
  matched with Docker's rules) keeps the project and drops .git, .venv, runs/ and caches;
- the requirements step, run here on requirements.txt, keeps every requirement but the container's
  own (``CONTAINER_PROVIDED``), with the same pins, and pip installs exactly that, under a
  constraint, before the project itself with ``--no-deps``;
- a non-root user with a fixed UID owns the project and is set after the installs;
- the default command is a file of the project that is in the image; the run-time ENV is set
  and holds no secret; every RUN parses in the Dockerfile's shell.

Every check returns the problems it finds; ``test_check_catches_mutation`` feeds each one a broken
copy of the files, to show that it can fail.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
REQUIREMENTS = ROOT / "requirements.txt"
SCRIPTS = sorted((ROOT / "examples" / "docker").glob("*.sh"))

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
MIN_PYTHON = (3, 12)

# What the base image provides and requirements.txt's install leaves out (the Dockerfile's
# ARG CONTAINER_PROVIDED): NVIDIA's builds of torch and triton, which its TransformerEngine and
# apex are compiled against. Installing requirements.txt's torch==... would replace them.
CONTAINER_PROVIDED = frozenset({"torch", "triton"})
FILTERED_REQUIREMENTS = "requirements.container.txt"

# Paths the build context must drop (they need not exist) and files it must keep.
MUST_EXCLUDE = (
    ".git/HEAD",
    ".venv/bin/python",
    "runs/tiny/checkpoints/latest_checkpointed_iteration.txt",
    "out/log.txt",
    "mhc_megatron/ops/__pycache__/mix.cpython-312.pyc",
    "tests/__pycache__/test_ops.cpython-312.pyc",
    ".pytest_cache/v/cache/nodeids",
    ".ruff_cache/CACHEDIR.TAG",
    "mhc_megatron.egg-info/PKG-INFO",
    ".env",
)
MUST_KEEP = (
    "requirements.txt",
    "pyproject.toml",
    "README.md",  # pyproject.toml's readme: pip install -e . reads it
    "pretrain_mhc.py",
    "mhc_megatron/__init__.py",
    "tools/preprocess_data.py",
    "examples/tiny/train.sh",
)
# Every file under these (caches aside) goes into the image.
KEEP_TREES = ("mhc_megatron", "tools", "examples")


# ------------------------------------------------------------------------------------------------
# Dockerfile parsing


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction.

    Attributes:
        keyword: The instruction, upper case (``RUN``, ``COPY``, ...).
        args: Everything after the keyword, continuation lines joined with a space.
        line: 1-based line where the instruction starts.
    """

    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Splits a Dockerfile into instructions (default escape character ``\\``).

    Comment lines (``#`` first, parser directives included) are dropped, also inside a
    continued instruction, as Docker does; so are blank lines. A line ending in ``\\`` continues
    on the next.

    Args:
        text: The Dockerfile.

    Returns:
        The instructions in file order.
    """
    instructions = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not parts:
            start = number
        continued = stripped.endswith("\\")
        parts.append(stripped[:-1].strip() if continued else stripped)
        if not continued:
            joined = " ".join(p for p in parts if p)
            keyword, _, args = joined.partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip(), start))
            parts = []
    if parts:
        raise ValueError(f"Dockerfile ends inside a continued instruction (line {start})")
    return instructions


def exec_form(args: str) -> list[str] | None:
    """Returns the JSON (exec form) argument list of an instruction, or None for shell form."""
    if not args.startswith("["):
        return None
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::-([^}]*))?\}|(\w+))")


def substitute(text: str, env: dict[str, str]) -> str:
    """Expands ``$VAR``, ``${VAR}`` and ``${VAR:-default}`` as Docker does in instructions."""

    def expand(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        value = env.get(name)
        if value is None or (value == "" and match.group(2) is not None):
            return match.group(2) or ""
        return value

    return _VARIABLE.sub(expand, text)


def key_values(instruction: Instruction) -> dict[str, str | None]:
    """Parses ``ARG name[=default]`` and ``ENV k=v k2=v2`` (or legacy ``ENV k v``)."""
    tokens = shlex.split(instruction.args)
    if instruction.keyword == "ENV" and tokens and "=" not in tokens[0]:
        return {tokens[0]: " ".join(tokens[1:])}
    pairs: dict[str, str | None] = {}
    for token in tokens:
        name, sep, value = token.partition("=")
        pairs[name] = value if sep else None
    return pairs


def split_flags(args: str) -> tuple[dict[str, str], list[str]]:
    """Splits ``--flag=value`` options off the front of a COPY/ADD argument list."""
    tokens = exec_form(args) or shlex.split(args)
    flags = {}
    while tokens and tokens[0].startswith("--"):
        name, _, value = tokens.pop(0)[2:].partition("=")
        flags[name] = value
    return flags, tokens


@dataclass
class Dockerfile:
    """The final stage of a parsed Dockerfile, with the variables each instruction sees.

    Attributes:
        base: The final FROM's image, variables expanded.
        stage: The final stage's instructions after its FROM.
        envs: For each instruction of ``stage``, the ARG defaults and ENV values set before it.
        shell: The shell RUN uses (``SHELL``, else ``/bin/sh -c``) at the last instruction.
    """

    base: str
    stage: list[Instruction]
    envs: list[dict[str, str]]
    shell: list[str]

    @classmethod
    def parse(cls, text: str) -> Dockerfile:
        """Parses a Dockerfile's text (see ``parse_dockerfile``)."""
        instructions = parse_dockerfile(text)
        froms = [i for i, ins in enumerate(instructions) if ins.keyword == "FROM"]
        if not froms:
            raise ValueError("Dockerfile has no FROM")
        global_args = {}
        for ins in instructions[: froms[0]]:
            if ins.keyword == "ARG":
                global_args.update({k: v or "" for k, v in key_values(ins).items()})
        from_tokens = [t for t in instructions[froms[-1]].args.split() if not t.startswith("--")]
        base = substitute(from_tokens[0], global_args)
        stage = instructions[froms[-1] + 1 :]
        env: dict[str, str] = {}
        envs = []
        shell = ["/bin/sh", "-c"]
        for ins in stage:
            envs.append(dict(env))
            if ins.keyword in ("ARG", "ENV"):
                for name, value in key_values(ins).items():
                    if value is not None:
                        env[name] = substitute(value, env)
                    elif name in global_args:  # ARG NAME re-declares a global ARG
                        env[name] = global_args[name]
            elif ins.keyword == "SHELL":
                shell = exec_form(ins.args) or shell
        return cls(base, stage, envs, shell)

    def find(self, keyword: str) -> list[int]:
        """Indices into ``stage`` of the instructions with this keyword."""
        return [i for i, ins in enumerate(self.stage) if ins.keyword == keyword]

    def run_command(self, index: int) -> str:
        """The command of a RUN (shell form as written; exec form joined)."""
        args = self.stage[index].args
        return " ".join(exec_form(args) or [args])


# ------------------------------------------------------------------------------------------------
# .dockerignore matching (Docker's moby/patternmatcher rules)


class DockerIgnore:
    """The build context's exclusion rules, matched the way Docker matches them.

    A pattern is cleaned (``a/./b/`` -> ``a/b``, leading ``/`` dropped) and matched against the
    whole path relative to the context root: ``*`` and ``?`` stay within one path element, ``**``
    spans any number of them, ``[...]`` is a character class. A path is excluded when a pattern
    matches it or one of its parent directories; ``!pattern`` re-includes, and the last matching
    pattern decides.
    """

    def __init__(self, text: str):
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for line in text.splitlines():
            pattern = line.strip()
            if not pattern or pattern.startswith("#"):
                continue
            negate = pattern.startswith("!")
            pattern = os.path.normpath(pattern.lstrip("!").strip()).replace(os.sep, "/")
            if len(pattern) > 1 and pattern.startswith("/"):
                pattern = pattern[1:]
            self.rules.append((negate, self._regex(pattern)))

    @staticmethod
    def _regex(pattern: str) -> re.Pattern[str]:
        out, i = "^", 0
        while i < len(pattern):
            c = pattern[i]
            if c == "*" and pattern[i + 1 : i + 2] == "*":
                i += 1
                if pattern[i + 1 : i + 2] == "/":  # "**/": any number of directories, even none
                    i += 1
                    out += "(.*/)?"
                else:
                    out += ".*"
            elif c == "*":
                out += "[^/]*"
            elif c == "?":
                out += "[^/]"
            elif c == "[":
                end = pattern.index("]", i + 1)
                body = pattern[i + 1 : end]
                out += "[" + ("^" + body[1:] if body.startswith(("!", "^")) else body) + "]"
                i = end
            elif c == "\\" and i + 1 < len(pattern):
                i += 1
                out += re.escape(pattern[i])
            else:
                out += re.escape(c)
            i += 1
        return re.compile(out + "$")

    def excluded(self, path: str) -> bool:
        """Whether a path (``/``-separated, relative to the context root) is left out."""
        parts = path.strip("/").split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        result = False
        for negate, regex in self.rules:
            if any(regex.match(p) for p in prefixes):
                result = not negate
        return result


# ------------------------------------------------------------------------------------------------
# Checks: each returns a list of problems (empty when the files are right)


def check_base_image(df: Dockerfile) -> list[str]:
    """The base is NVIDIA's PyTorch container at a pinned YY.MM-py3 tag with Python >= 3.12."""
    match = re.fullmatch(r"([^@:]+(?::\d+)?/[^@:]+)(?::([\w.-]+))?(?:@(sha256:\w+))?", df.base)
    if not match:
        return [f"cannot parse the base image {df.base!r}"]
    repository, tag, digest = match.groups()
    problems = []
    if repository != NGC_PYTORCH:
        problems.append(f"base {repository} is not {NGC_PYTORCH} (TransformerEngine, apex)")
    if digest is not None and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        problems.append(f"malformed digest {digest}")
    if tag is None or tag == "latest":
        problems.append(f"base {df.base} is not pinned to a release tag")
        return problems
    release = re.fullmatch(r"(\d{2}\.\d{2})-py3", tag)
    if release is None:
        problems.append(f"tag {tag} is not a YY.MM-py3 release")
    elif release.group(1) not in NGC_PYTHON:
        problems.append(f"release {release.group(1)}: add its Python, with a source, to NGC_PYTHON")
    elif NGC_PYTHON[release.group(1)] < MIN_PYTHON:
        problems.append(
            f"release {release.group(1)} has Python {NGC_PYTHON[release.group(1)]}, "
            f"megatron-core 0.19.2 needs {MIN_PYTHON}"
        )
    return problems


def check_copy_sources(df: Dockerfile, ignore: DockerIgnore, root: Path = ROOT) -> list[str]:
    """Every COPY/ADD source exists in the repository and is in the build context."""
    problems = []
    for i in df.find("COPY") + df.find("ADD"):
        flags, tokens = split_flags(df.stage[i].args)
        if "from" in flags:
            continue  # from another stage or image, not the context
        for source in tokens[:-1]:
            source = substitute(source, df.envs[i])
            if re.match(r"\w+://", source):
                problems.append(f"line {df.stage[i].line}: {source} is fetched at build time")
                continue
            hits = [root] if source in (".", "./") else list(root.glob(source))
            if not hits:
                problems.append(f"line {df.stage[i].line}: {source} does not exist")
            for hit in hits:
                relative = hit.relative_to(root).as_posix()
                if relative != "." and ignore.excluded(relative):
                    problems.append(f"line {df.stage[i].line}: .dockerignore excludes {source}")
    return problems


def check_build_context(ignore: DockerIgnore, root: Path = ROOT) -> list[str]:
    """The context drops history, environments, runs and caches, and keeps the project."""
    problems = [f"{p} is in the build context" for p in MUST_EXCLUDE if not ignore.excluded(p)]
    for path in MUST_KEEP:
        if not (root / path).is_file():
            problems.append(f"{path} is missing from the repository")
        elif ignore.excluded(path):
            problems.append(f".dockerignore excludes {path}")
    for tree in KEEP_TREES:
        for path in sorted((root / tree).rglob("*")):
            relative = path.relative_to(root).as_posix()
            if path.is_file() and "__pycache__" not in path.parts and ignore.excluded(relative):
                problems.append(f".dockerignore excludes {relative}")
    return problems


def _requirements(text: str) -> tuple[dict[str, str], list[str]]:
    """Reads requirement lines as {canonical name: pin and markers}, and the lines it cannot."""
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


def run_requirements_filter(df: Dockerfile, requirements_text: str, tmp: Path) -> str | None:
    """Runs the Dockerfile's requirements-filter RUN on a requirements.txt, as the build would.

    Args:
        df: The parsed Dockerfile.
        requirements_text: The requirements.txt to filter.
        tmp: An empty directory to run in (the RUN uses relative paths, as in WORKDIR).

    Returns:
        The filtered file's text, or None when no RUN writes it.
    """
    writes = re.compile(r">\s*" + re.escape(FILTERED_REQUIREMENTS))
    runs = [i for i in df.find("RUN") if writes.search(df.run_command(i))]
    if len(runs) != 1:
        return None
    (tmp / "requirements.txt").write_text(requirements_text)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **df.envs[runs[0]]}
    shell = df.shell if shutil.which(df.shell[0]) else ["bash", "-c"]
    result = subprocess.run(
        [*shell, df.run_command(runs[0])],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        raise RuntimeError(f"requirements filter failed: {result.stderr}")
    return (tmp / FILTERED_REQUIREMENTS).read_text()


def _pip_installs(command: str) -> list[tuple[str, list[str]]]:
    """The ``pip install`` commands of a RUN: (the whole command, with any ``VAR=value`` before
    it, and the arguments after ``install``)."""
    installs = []
    for segment in re.split(r"&&|\|\||;|\|", command):
        tokens = segment.split()
        for n in range(len(tokens) - 1):
            if tokens[n].endswith("pip") and tokens[n + 1] == "install":
                installs.append((segment, tokens[n + 2 :]))
                break
    return installs


def check_install_step(df: Dockerfile, requirements_text: str, tmp: Path) -> list[str]:
    """The image installs requirements.txt minus CONTAINER_PROVIDED, pins unchanged, then the
    project with --no-deps; nothing installs torch or triton."""
    problems = []
    declared = set()
    for i in df.find("ARG"):
        value = key_values(df.stage[i]).get("CONTAINER_PROVIDED")
        if value is not None:
            declared = {canonicalize_name(n) for n in value.split()}
    if declared != CONTAINER_PROVIDED:
        problems.append(
            f"ARG CONTAINER_PROVIDED is {sorted(declared)}; the documented exclusions are "
            f"{sorted(CONTAINER_PROVIDED)} (tests/test_docker.py)"
        )

    wanted, other = _requirements(requirements_text)
    if other:
        # -r/-c lines name files the Dockerfile does not copy.
        problems.append(f"requirements.txt lines the image cannot follow: {other}")
    wanted = {n: pin for n, pin in wanted.items() if n not in CONTAINER_PROVIDED}
    filtered = run_requirements_filter(df, requirements_text, tmp)
    if filtered is None:
        return [*problems, f"no single RUN writes {FILTERED_REQUIREMENTS}"]
    got, _ = _requirements(filtered)
    for name in sorted(wanted.keys() - got.keys()):
        problems.append(f"{name}{wanted[name]} from requirements.txt is not installed")
    for name in sorted(got.keys() - wanted.keys()):
        problems.append(f"{name}{got[name]} is installed but is container-provided or unknown")
    for name in sorted(wanted.keys() & got.keys()):
        if wanted[name] != got[name]:
            problems.append(f"{name}: installed {got[name]}, requirements.txt {wanted[name]}")

    requirements_at = project_at = None
    for i in df.find("RUN"):
        command = df.run_command(i)
        for segment, args in _pip_installs(command):
            if args[-2:] == ["-r", FILTERED_REQUIREMENTS]:
                requirements_at = i
                constrained = "PIP_CONSTRAINT=" in segment or {"-c", "--constraint"} & set(args)
                if not (constrained or df.envs[i].get("PIP_CONSTRAINT")):
                    problems.append("the requirements install runs without a pip constraint")
            elif "-r" in args:
                problems.append(f"line {df.stage[i].line}: pip installs an unfiltered file {args}")
            elif "-e" in args or "." in args:
                project_at = i
                if "--no-deps" not in args:
                    problems.append("the project is installed without --no-deps")
            for token in args:
                name = re.split(r"[\s\[=<>!~;@]", token, maxsplit=1)[0]
                if not token.startswith("-") and canonicalize_name(name) in CONTAINER_PROVIDED:
                    problems.append(f"line {df.stage[i].line}: pip installs {token}")
    if requirements_at is None:
        problems.append(f"no RUN runs pip install -r {FILTERED_REQUIREMENTS}")
    if project_at is None:
        problems.append("no RUN installs the project (pip install --no-deps -e .)")
    elif requirements_at is not None and project_at < requirements_at:
        problems.append("the project is installed before its requirements")
    return problems


def check_user(df: Dockerfile) -> list[str]:
    """A non-root user with a fixed UID, set after every install, owns the copied project."""
    users = df.find("USER")
    if not users:
        return ["no USER: the container runs as root"]
    last = users[-1]
    user = substitute(df.stage[last].args, df.envs[last]).split(":")[0]
    problems = []
    if user in ("root", "0", ""):
        problems.append(f"the final USER is {user or 'empty'}")
    for i in df.find("RUN"):
        if _pip_installs(df.run_command(i)) and i > last:
            problems.append(f"line {df.stage[i].line}: pip install after USER {user}")
    created = False
    for i in df.find("RUN"):
        command = substitute(df.run_command(i), df.envs[i]).replace('"', "")
        useradd = r"useradd\s.*?(?:--uid|-u)[\s=](\d+)\s.*?\b" + re.escape(user) + r"\b"
        uid = re.search(useradd, command)
        created |= bool(uid and int(uid.group(1)) != 0 and i < last)
    if not created:
        problems.append(f"user {user} is not created with a fixed non-zero UID (useradd --uid)")
    for i in df.find("COPY"):
        flags, tokens = split_flags(df.stage[i].args)
        if tokens[:1] == ["."]:
            owner = substitute(flags.get("chown", ""), df.envs[i]).split(":")[0]
            if owner != user:
                problems.append(f"the project is copied without --chown={user}")
    return problems


def check_command(df: Dockerfile, ignore: DockerIgnore, root: Path = ROOT) -> list[str]:
    """CMD/ENTRYPOINT use exec form, and the files they name are project files in the image."""
    problems, command = [], []
    found = {keyword: df.find(keyword) for keyword in ("ENTRYPOINT", "CMD")}
    if not any(found.values()):
        return ["no CMD or ENTRYPOINT"]
    for keyword, indices in found.items():
        if not indices:
            continue
        args = exec_form(df.stage[indices[-1]].args)
        if args is None:
            problems.append(f"{keyword} is in shell form (signals would go to /bin/sh)")
            continue
        command += [substitute(a, df.envs[indices[-1]]) for a in args]
    workdirs = df.find("WORKDIR")
    workdir = substitute(df.stage[workdirs[-1]].args, df.envs[workdirs[-1]]) if workdirs else "/"
    for n, arg in enumerate(command):
        if "/" not in arg and n > 0:
            continue  # a plain argument
        if "/" not in arg:
            problems.append(f"{arg} is a program from PATH, not a file of the project")
            continue
        relative = arg[len(workdir) :].lstrip("/") if arg.startswith(workdir + "/") else arg
        if relative.startswith("/"):
            problems.append(f"{arg} is outside the project directory {workdir}")
        elif not (root / relative).is_file():
            problems.append(f"{arg} does not exist in the repository")
        elif ignore.excluded(relative):
            problems.append(f".dockerignore excludes {arg}")
        elif n == 0 and not os.access(root / relative, os.X_OK):
            problems.append(f"{arg} is not executable")
    return problems


def check_environment(df: Dockerfile) -> list[str]:
    """Run-time ENV that Megatron wants, and no secret baked into ARG or ENV."""
    env: dict[str, str] = {}
    for i in df.find("ENV"):
        env.update({k: v or "" for k, v in key_values(df.stage[i]).items()})
    problems = [
        f"ENV {name}={value} is missing"
        for name, value in (("PYTHONUNBUFFERED", "1"), ("CUDA_DEVICE_MAX_CONNECTIONS", "1"))
        if env.get(name) != value
    ]
    secret = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|CREDENTIAL", re.I)
    for i in df.find("ARG") + df.find("ENV"):
        problems += [
            f"{df.stage[i].keyword} {n} looks like a secret"
            for n in key_values(df.stage[i])
            if secret.search(n)
        ]
    return problems


def check_run_syntax(df: Dockerfile) -> list[str]:
    """Every RUN parses in the Dockerfile's shell (``-n``: read, not run), so that a quoting slip
    shows here rather than minutes into a build."""
    problems = []
    shell = df.shell if shutil.which(df.shell[0]) else ["bash", "-c"]
    for i in df.find("RUN"):
        if exec_form(df.stage[i].args) is not None:
            continue
        result = subprocess.run(
            [shell[0], "-n", *shell[1:], df.stage[i].args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode != 0:
            problems.append(f"line {df.stage[i].line}: {result.stderr.strip()}")
    return problems


# ------------------------------------------------------------------------------------------------
# Tests


def _files() -> tuple[str, str, str]:
    return DOCKERFILE.read_text(), DOCKERIGNORE.read_text(), REQUIREMENTS.read_text()


def _run_check(name: str, dockerfile: str, dockerignore: str, requirements: str, tmp: Path):
    df, ignore = Dockerfile.parse(dockerfile), DockerIgnore(dockerignore)
    return {
        "base": lambda: check_base_image(df),
        "copy": lambda: check_copy_sources(df, ignore),
        "context": lambda: check_build_context(ignore),
        "install": lambda: check_install_step(df, requirements, tmp),
        "user": lambda: check_user(df),
        "command": lambda: check_command(df, ignore),
        "environment": lambda: check_environment(df),
        "syntax": lambda: check_run_syntax(df),
    }[name]()


CHECKS = ("base", "copy", "context", "install", "user", "command", "environment", "syntax")


@pytest.mark.parametrize("check", CHECKS)
def test_dockerfile_check(check, tmp_path):
    """Each check finds nothing wrong with the repository's files."""
    assert _run_check(check, *_files(), tmp_path) == []


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
    dockerfile = DOCKERFILE.read_text()
    assert _run_check("install", dockerfile, "", requirements, tmp_path) == []
    kept, _ = _requirements((tmp_path / FILTERED_REQUIREMENTS).read_text())
    assert {"newdep", "torchvision", "triton-kernels"} <= kept.keys()
    assert not CONTAINER_PROVIDED & kept.keys()


def _replace(old: str, new: str):
    def mutate(text: str) -> str:
        assert old in text, f"mutation target {old!r} is no longer in the file: update the test"
        return text.replace(old, new)

    return mutate


def _append(extra: str):
    return lambda text: text + extra


BASE = "nvcr.io/nvidia/pytorch:26.07-py3"
FILTER = '(${names})([^A-Za-z0-9._-]|$)" requirements.txt \\\n        > '
# name: (check, file to break, how). Each must make that check report a problem.
MUTATIONS = {
    "tag latest": ("base", "dockerfile", _replace(BASE, f"{NGC_PYTORCH}:latest")),
    "no tag": ("base", "dockerfile", _replace(BASE, NGC_PYTORCH)),
    "python 3.10": ("base", "dockerfile", _replace(BASE, f"{NGC_PYTORCH}:24.10-py3")),
    "undocumented release": ("base", "dockerfile", _replace(BASE, f"{NGC_PYTORCH}:30.01-py3")),
    "not NGC": ("base", "dockerfile", _replace(BASE, "pytorch/pytorch:2.13.0-cuda13.0")),
    "missing source": ("copy", "dockerfile", _replace("COPY requirements.txt", "COPY reqs.txt")),
    "ignored source": ("copy", "dockerignore", _append("requirements.txt\n")),
    "venv in context": ("context", "dockerignore", _replace("\n.venv\n", "\n")),
    "caches at root only": (
        "context",
        "dockerignore",
        _replace("**/__pycache__\n**/*.py[cod]", "__pycache__\n*.pyc"),
    ),
    "scripts ignored": ("context", "dockerignore", _append("**/*.sh\n")),
    "exclusion added": ("install", "dockerfile", _replace('"torch triton"', '"torch einops"')),
    "torch not excluded": ("install", "dockerfile", _replace('"torch triton"', '"triton"')),
    "filter drops einops": (
        "install",
        "dockerfile",
        _replace("(${names})(", "(${names}|einops)("),
    ),
    "filter changes pins": (
        "install",
        "dockerfile",
        _replace(FILTER, FILTER.replace("requirements.txt", "requirements.txt | sed s/==/~=/")),
    ),
    "unfiltered install": (
        "install",
        "dockerfile",
        _replace(f"-r {FILTERED_REQUIREMENTS}", "-r requirements.txt"),
    ),
    "no constraint": (
        "install",
        "dockerfile",
        _replace("PIP_CONSTRAINT=/etc/pip/mhc-constraint.txt \\", "\\"),
    ),
    "project with deps": ("install", "dockerfile", _replace("--no-deps -e .", "-e .")),
    "torch installed": ("install", "dockerfile", _append("RUN pip install --no-deps torch\n")),
    "root user": ("user", "dockerfile", _replace("USER ${USER_NAME}", "USER root")),
    "no user": ("user", "dockerfile", _replace("USER ${USER_NAME}", "")),
    "install after user": ("user", "dockerfile", _append("RUN pip install --user einops\n")),
    "uid not fixed": ("user", "dockerfile", _replace('--uid "${USER_UID}" ', "")),
    "not owned": ("user", "dockerfile", _replace("--chown=${USER_NAME}:${USER_NAME} ", "")),
    "missing command": ("command", "dockerfile", _replace("examples/tiny/train.sh", "ex/t.sh")),
    "shell form": ("command", "dockerfile", _replace('CMD ["examples/tiny/train.sh"]', "CMD x")),
    "not executable": (
        "command",
        "dockerfile",
        _replace("examples/tiny/train.sh", "tools/preprocess_data.py"),
    ),
    "no max connections": (
        "environment",
        "dockerfile",
        _replace(" CUDA_DEVICE_MAX_CONNECTIONS=1\n", " X=1\n"),
    ),
    "secret": ("environment", "dockerfile", _append("ARG HF_TOKEN=hf_abc\n")),
    "unclosed if": ("syntax", "dockerfile", _replace("; fi \\", " \\")),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_check_catches_mutation(mutation, tmp_path):
    """Each check reports a problem on a copy of the files broken in the way it guards against."""
    check, target, mutate = MUTATIONS[mutation]
    files = dict(zip(("dockerfile", "dockerignore", "requirements"), _files(), strict=True))
    files[target] = mutate(files[target])
    problems = _run_check(check, *files.values(), tmp_path)
    assert problems, f"check {check} missed the mutation {mutation!r}"


def test_dockerignore_matches_like_docker():
    """The matcher follows Docker's rules: anchored at the root, ``**`` at any depth, ``!``."""
    ignore = DockerIgnore("__pycache__\n**/*.pyc\nruns\n!runs/keep.txt\n/build/\ndocs/*.md\n")
    assert ignore.excluded("__pycache__/a.pyc")
    assert ignore.excluded("pkg/mod.pyc")
    assert ignore.excluded("mod.pyc")  # "**/" matches no directory too
    assert not ignore.excluded("pkg/__pycache__/x.txt")  # no "**/": the root only
    assert ignore.excluded("runs/tiny/ckpt")  # the parent directory matches
    assert not ignore.excluded("runs/keep.txt")
    assert ignore.excluded("build/lib/x.py")
    assert ignore.excluded("docs/a.md") and not ignore.excluded("docs/sub/a.md")


def test_parser_joins_continuations_and_skips_comments():
    """Continued lines join, comment lines inside them vanish, exec form parses as JSON."""
    text = 'FROM a:1\n# c\nRUN echo 1 \\\n  # inside\n  && echo 2\nCMD ["x", "y"]\n'
    instructions = parse_dockerfile(text)
    assert [(i.keyword, i.args, i.line) for i in instructions] == [
        ("FROM", "a:1", 1),
        ("RUN", "echo 1 && echo 2", 3),
        ("CMD", '["x", "y"]', 6),
    ]
    assert exec_form(instructions[2].args) == ["x", "y"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_helper_script_is_valid_bash(script):
    """examples/docker's scripts are executable and parse (``bash -n``)."""
    assert os.access(script, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
