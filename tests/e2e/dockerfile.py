"""The project's Dockerfile and .dockerignore, read for the static tests beside this module.

The Dockerfile is parsed by dockerfile-parse (line continuations, comments, ARG and ENV values in
force at each instruction, ``$VAR`` substitution as Docker does it); nothing here parses it by
hand. The .dockerignore patterns are kept to two shapes whose Docker meaning ``fnmatch`` gives
exactly (``excluded``); ``test_docker_context.py`` fails on any other shape.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from dockerfile_parse import DockerfileParser
from dockerfile_parse.util import WordSplitter

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
REQUIREMENTS = ROOT / "requirements.txt"


@dataclass(frozen=True)
class Instruction:
    """One instruction of the Dockerfile.

    Attributes:
        keyword: Upper case (``RUN``, ``COPY``, ...).
        value: Everything after the keyword, continuation lines joined, variables as written.
        line: 1-based line where it starts.
        args: The ARG values in force at it (defaults; no --build-arg).
        envs: The ENV values in force at it.
    """

    keyword: str
    value: str
    line: int
    args: dict[str, str] = field(repr=False)
    envs: dict[str, str] = field(repr=False)

    def expanded(self) -> str:
        """The value with ``$VAR``/``${VAR}`` substituted from ARG and ENV, quotes removed."""
        return WordSplitter(self.value, args=self.args, envs=self.envs).dequote()

    def words(self) -> list[str]:
        """The value split into words as Docker splits COPY/USER arguments, substituted."""
        return list(WordSplitter(self.value, args=self.args, envs=self.envs).split())

    def exec_form(self) -> list[str] | None:
        """The JSON argument list of a CMD/ENTRYPOINT/SHELL/RUN, or None for shell form."""
        try:
            value = json.loads(self.value)
        except json.JSONDecodeError:
            return None
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return value if ok else None


@dataclass(frozen=True)
class Dockerfile:
    """A parsed Dockerfile: the final stage's base image and instructions (FROM excluded)."""

    base: str | None
    stage: list[Instruction]

    @classmethod
    def parse(cls, text: str) -> Dockerfile:
        parser = DockerfileParser(fileobj=io.BytesIO(text.encode()))
        instructions = [
            Instruction(s["instruction"], s["value"], s["startline"] + 1, c.args, c.envs)
            for s, c in zip(parser.structure, parser.context_structure, strict=True)
            if s["instruction"] != "COMMENT"
        ]
        froms = [i for i, ins in enumerate(instructions) if ins.keyword == "FROM"]
        return cls(parser.baseimage, instructions[froms[-1] + 1 :] if froms else instructions)

    def find(self, keyword: str) -> list[Instruction]:
        """The final stage's instructions with this keyword, in file order."""
        return [ins for ins in self.stage if ins.keyword == keyword]

    def index(self, ins: Instruction) -> int:
        """The position of an instruction in the stage (for before/after comparisons)."""
        return next(n for n, other in enumerate(self.stage) if other is ins)


def read_dockerfile() -> Dockerfile:
    return Dockerfile.parse(DOCKERFILE.read_text())


def pip_installs(command: str) -> list[str]:
    """The ``pip install`` commands among a RUN's ``&&``/``||``/``;``/``|``-joined commands, each
    with any ``VAR=value`` written before it."""
    segments = re.split(r"&&|\|\||[;|]", command)
    return [s.strip() for s in segments if re.search(r"\bpip\s+install\b", s)]


# ------------------------------------------------------------------------------------------------
# .dockerignore


def ignore_patterns(text: str) -> list[str]:
    """The patterns of a .dockerignore: its lines less blanks and ``#`` comments."""
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def odd_patterns(patterns: list[str]) -> list[str]:
    """Patterns outside the two shapes ``excluded`` reads: ``NAME`` (one path element, which may
    hold ``*``, ``?``, ``[...]``) and ``**/NAME``. Anything else (a ``/`` inside, ``!``, a
    backslash) has subtler Docker rules, which these tests do not model."""
    shape = re.compile(r"(\*\*/)?[^/!\\]+")
    return [p for p in patterns if not shape.fullmatch(p) or "**" in p.removeprefix("**/")]


def excluded(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` (``/``-separated, from the context root) out of the build
    context, for patterns of the shapes ``odd_patterns`` allows: ``NAME`` matches the top-level
    entry (and so all under it), ``**/NAME`` any element of the path at any depth. ``*`` stays
    within one element, as it does for Docker."""
    parts = path.split("/")
    for pattern in patterns:
        name = pattern.removeprefix("**/")
        candidates = parts if name != pattern else parts[:1]
        if any(fnmatchcase(part, name) for part in candidates):
            return True
    return False


# ------------------------------------------------------------------------------------------------
# Broken copies of the files, to show that each check can fail


def replace(old: str, new: str) -> Callable[[str], str]:
    """A mutation that replaces ``old`` (which must be in the file) by ``new``."""

    def mutate(text: str) -> str:
        assert old in text, f"mutation target {old!r} is no longer in the file: update the test"
        return text.replace(old, new)

    return mutate


def append(extra: str) -> Callable[[str], str]:
    """A mutation that adds lines at the end of the file."""
    return lambda text: text + extra
