"""Static checks of the Docker build context that .dockerignore leaves (no engine; milliseconds).

The context must drop history, local environments, run outputs, caches and secrets, and keep the
project: every file the Dockerfile copies or runs and every file under mhc_megatron/, tools/ and
examples/. tests/e2e/test_docker_image.py's real build shows only that what the tiny example
needs is kept, not that the rest is, nor that anything is dropped.

The patterns are read with ``excluded`` (tests/e2e/dockerfile.py), exact for the two pattern
shapes that ``test_dockerignore_patterns_have_simple_shapes`` allows. Each check returns the
problems it finds; ``test_check_catches_mutation`` feeds it a broken .dockerignore.
"""

from __future__ import annotations

import pytest

from tests.e2e.dockerfile import (
    DOCKERFILE,
    DOCKERIGNORE,
    ROOT,
    Dockerfile,
    append,
    excluded,
    ignore_patterns,
    odd_patterns,
    replace,
)

# Paths the context must drop (they need not exist) and files it must keep.
MUST_EXCLUDE = (
    ".git/HEAD",
    ".venv/bin/python",
    "runs/tiny/checkpoints/latest_checkpointed_iteration.txt",
    "out/log.txt",
    "mhc_megatron/ops/__pycache__/mix.cpython-312.pyc",
    "tests/__pycache__/test_ops.cpython-312.pyc",
    "mix.pyc",
    ".pytest_cache/v/cache/nodeids",
    "tests/.ruff_cache/CACHEDIR.TAG",
    "mhc_megatron.egg-info/PKG-INFO",
    ".env",
    "examples/tiny/.env",
)
MUST_KEEP = (
    "requirements.txt",
    "pyproject.toml",
    "README.md",  # pyproject.toml's readme: pip install -e . reads it
    "pretrain_mhc.py",
)
# Every file under these (caches aside) goes into the image.
KEEP_TREES = ("mhc_megatron", "tools", "examples")


def check_excludes(patterns: list[str]) -> list[str]:
    """Every path of ``MUST_EXCLUDE`` is left out of the context."""
    return [f"{p} is in the build context" for p in MUST_EXCLUDE if not excluded(p, patterns)]


def check_keeps(patterns: list[str], df: Dockerfile) -> list[str]:
    """``MUST_KEEP``, every COPY/ADD source and every file of ``KEEP_TREES`` is in the context."""
    paths = list(MUST_KEEP)
    for ins in df.find("COPY") + df.find("ADD"):
        words = [w for w in ins.words() if not w.startswith("--")]
        paths += [s for s in words[:-1] if s not in (".", "./")]
    for tree in KEEP_TREES:
        for path in sorted((ROOT / tree).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                paths.append(path.relative_to(ROOT).as_posix())
    problems = [
        f"{p} is missing from the repository" for p in MUST_KEEP if not (ROOT / p).is_file()
    ]
    excludes = [p for p in dict.fromkeys(paths) if excluded(p, patterns)]
    return problems + [f".dockerignore excludes {p}" for p in excludes]


def _problems(dockerignore: str) -> list[str]:
    patterns = ignore_patterns(dockerignore)
    df = Dockerfile.parse(DOCKERFILE.read_text())
    shapes = [f"pattern {p!r}: use NAME or **/NAME" for p in odd_patterns(patterns)]
    return shapes + check_excludes(patterns) + check_keeps(patterns, df)


def test_build_context_checks_pass():
    """.dockerignore drops what it must and keeps the project."""
    assert _problems(DOCKERIGNORE.read_text()) == []


# name: how to break .dockerignore. Each must make the checks report a problem.
MUTATIONS = {
    "venv in context": replace("\n.venv\n", "\n"),
    "git in context": replace("\n.git\n", "\n"),
    "caches at root only": replace("**/__pycache__\n**/*.py[cod]", "__pycache__\n*.pyc"),
    "scripts ignored": append("**/*.sh\n"),
    "copied source ignored": append("requirements.txt\n"),
    "tree ignored": append("tools\n"),
    "negation": append("!runs/keep.txt\n"),
    "nested pattern": append("examples/docker\n"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_check_catches_mutation(mutation):
    """The checks report a problem on a copy of .dockerignore broken in the way they guard
    against."""
    assert _problems(MUTATIONS[mutation](DOCKERIGNORE.read_text())), mutation


def test_excluded_follows_docker_rules():
    """``excluded`` matches as Docker does for the allowed shapes: ``NAME`` at the root only (and
    all below it), ``**/NAME`` at any depth, the root included; ``*`` within one element."""
    patterns = ["runs", "**/__pycache__", "**/*.py[cod]", "*.sqsh"]
    assert excluded("runs/tiny/ckpt", patterns) and not excluded("examples/runs", patterns)
    assert excluded("__pycache__/a", patterns) and excluded("a/b/__pycache__/c", patterns)
    assert excluded("mix.pyc", patterns) and excluded("a/b/mix.pyo", patterns)
    assert not excluded("a/mix.py", patterns)
    assert excluded("img.sqsh", patterns) and not excluded("runs2/img.sqsh", patterns)
