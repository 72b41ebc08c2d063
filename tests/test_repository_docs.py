"""The repository carries the documents it cites: every ``docs/*.md`` that the code, the tools,
the benchmarks, the examples or a README names exists in the checkout (a user who clones the
repository has nothing else)."""

import re

import pytest

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
    for path in [*REPO_ROOT.glob("mhc_megatron/**/*.py"), *REPO_ROOT.glob("tests/**/*.py"),
                 *REPO_ROOT.glob("tools/*.py")]:  # fmt: skip
        cited |= {int(n) for n in re.findall(r"spec(?:\.md``?)? section (\d+)", path.read_text())}
    assert cited and cited <= headings, (sorted(cited), sorted(headings))


# READMEs whose commands run on this machine (examples/docker's run inside the image).
READMES = ["README.md", "benchmarks/README.md", "examples/scaling/README.md",
           "examples/stability/README.md", "examples/slurm/README.md"]  # fmt: skip
COMMAND = re.compile(r"(?<![\w/.-])((?:\.venv/bin/)?python3?) ((?:tools|benchmarks)/[\w/]+\.py)")


def _readme_commands() -> dict[str, str]:
    """``{script: the python it is run with}`` over the READMEs' commands."""
    commands = {}
    for name in READMES:
        path = REPO_ROOT / name
        if path.is_file():
            for python, script in COMMAND.findall(path.read_text()):
                commands.setdefault(script, python)
                if python != ".venv/bin/python":
                    commands[script] = f"{python} ({name})"
    return commands


def test_readme_commands_run_from_a_fresh_shell():
    """Every ``python tools/...`` / ``benchmarks/...`` command a README shows runs as written in a
    new shell: it names the project's interpreter (a bare ``python`` would be the system's,
    without torch or megatron-core), and the script exists and answers ``--help``."""
    import subprocess
    import sys

    venv_python = REPO_ROOT / ".venv" / "bin" / "python"  # what tools/setup_env.sh makes
    python = str(venv_python) if venv_python.exists() else sys.executable
    commands = _readme_commands()
    assert "tools/count_params.py" in commands and "benchmarks/bench_experts.py" in commands
    bare = {script: python for script, python in commands.items() if python != ".venv/bin/python"}
    assert not bare, f"commands without .venv/bin/python: {bare}"
    missing = [script for script in commands if not (REPO_ROOT / script).is_file()]
    assert not missing
    running = {
        script: subprocess.Popen(
            [python, script, "--help"],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for script in commands
    }
    for script, proc in running.items():
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "usage" in output.lower(), (script, output[-2000:])


def test_stability_docs_quote_the_committed_results():
    """examples/stability/README.md (and the README's summary) quote the numbers of the results
    kept in examples/stability/results/stability.json, the run that made the committed plot."""
    import json

    results = json.loads((REPO_ROOT / "examples/stability/results/stability.json").read_text())
    runs = {run["label"]: run for run in results["runs"]}
    readme = (REPO_ROOT / "examples/stability/README.md").read_text()
    for label, run in runs.items():  # the main table: one row per run, its loss last
        row = re.search(rf"^\| {label} \|(.*)$", readme, flags=re.M)
        assert row and row.group(1).rstrip(" |").endswith(f"{run['lm_loss']:.3f}"), label
    hc = runs["hc"]["summary"]
    quoted = f"**{round(hc['composite_fwd_gain_last'], -1):,.0f} / "
    quoted += f"{round(hc['composite_bwd_gain_last'], -1):,.0f}**"
    assert quoted in readme, quoted
    top = (REPO_ROOT / "README.md").read_text()
    assert f"reaches {round(hc['composite_fwd_gain_last'], -1):,.0f}" in top
    # The per-layer table, to the digits it shows (at least two significant ones).
    layers = re.search(r"^\| layer \|(.*)$", readme, flags=re.M).group(1)
    values = re.search(r"^\| HC composite fwd gain \|(.*)$", readme, flags=re.M).group(1)
    layers = [int(x) for x in layers.strip(" |").split("|")]
    values = [float(x.replace(",", "")) for x in values.strip(" |").split("|")]
    sites = runs["hc"]["sites"]
    for layer, value in zip(layers, values, strict=True):
        measured = sites[f"L{layer:03d}.mlp"]["composite_fwd_gain"]
        assert value == pytest.approx(measured, rel=0.02), layer


def test_readme_quick_subset_is_a_real_subset():
    """The README's quick test command selects by the ``slow`` marker that conftest.py sets on
    the modules that launch or train, and names a module that exists for each of them."""
    from tests.conftest import SLOW_MODULES

    readme = (REPO_ROOT / "README.md").read_text()
    assert '.venv/bin/python -m pytest -q -m "not slow"' in readme
    test_files = {path.name for path in (REPO_ROOT / "tests").rglob("test_*.py")}
    assert SLOW_MODULES and set(SLOW_MODULES) <= test_files, set(SLOW_MODULES) - test_files
