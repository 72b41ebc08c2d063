"""The repository carries the documents it cites: every ``docs/*.md`` that the code, the tools,
the benchmarks, the examples or a README names exists in the checkout (a user who clones the
repository has nothing else)."""

import re

from tests.launching import REPO_ROOT

CITED = re.compile(r"\bdocs/[\w.-]+\.md\b")
SEARCHED = ("mhc_megatron", "tools", "benchmarks", "examples", "docs")


def _citing_files():
    yield from REPO_ROOT.glob("*.md")
    yield REPO_ROOT / "pretrain_mhc.py"
    for folder in SEARCHED:
        for pattern in ("*.py", "*.md", "*.sh"):
            yield from (REPO_ROOT / folder).rglob(pattern)


def test_every_cited_doc_is_in_the_repository():
    cited = {}
    for path in _citing_files():
        for name in CITED.findall(path.read_text(errors="replace")):
            cited.setdefault(name, path.relative_to(REPO_ROOT))
    assert "docs/mhc-spec.md" in cited  # the math contract the ops and kernels cite
    missing = {
        name: str(where) for name, where in cited.items() if not (REPO_ROOT / name).is_file()
    }
    assert not missing, f"cited but not in the repository: {missing}"


def test_the_spec_has_the_sections_the_code_cites():
    """Code cites the spec by section number ("spec section 4"): each cited one is a heading."""
    spec = (REPO_ROOT / "docs" / "mhc-spec.md").read_text()
    headings = {int(n) for n in re.findall(r"^## (\d+)\. ", spec, flags=re.M)}
    cited = set()
    for path in [*REPO_ROOT.glob("mhc_megatron/**/*.py"), *REPO_ROOT.glob("tests/*.py"),
                 *REPO_ROOT.glob("tools/*.py")]:  # fmt: skip
        cited |= {int(n) for n in re.findall(r"spec(?:\.md``?)? section (\d+)", path.read_text())}
    assert cited and cited <= headings, (sorted(cited), sorted(headings))
