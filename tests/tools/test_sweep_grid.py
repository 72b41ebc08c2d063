"""The scaling sweep's grid file: what a bad one says to change, what a good one expands into."""

import pytest

from mhc_megatron.sweep.grid import SweepError, load_grid
from mhc_megatron.sweep.plan import plan
from tests.launching import REPO_ROOT
from tests.tools.sweep_helpers import EXAMPLE_GRID, GOOD, ORDER, cli


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("sizes:", "sizez:", r"unknown key 'sizez' \(did you mean 'sizes'\?\); the keys are"),
        ("budgets:\n  short: [--train-iters, 20]", "",
         r"missing key 'budgets': add a mapping of budget names to arguments"),
        ("  short: [--train-iters, 20]", "  {}",
         r"'budgets' is empty: .*budgets: \{default: \[\]\}"),
        ("[residual, mhc]", "[residual, mhcc]",
         r"variants\[1\] = 'mhcc' is not a variant; use mhc, mhc-lite, hc, residual"),
        ("[residual, mhc]", "[mhc, mhc]",
         r"variant 'mhc' is listed twice in 'variants': remove one"),
        ("  s1: [--num-layers, 2]", "  s1: [--num-layers, 2]\n  s1: [--num-layers, 4]",
         r"line 6: key 's1' is given twice .*line 5.*: give each entry a different name"),
        ("recipe: tiny", "recipe: tiy", r"recipe: no recipe 'tiy' in examples/recipes; use one of"),
        ("  s1:", "  s-1:", r"sizes: name 's-1' may hold only letters, digits.*rename it"),
        ("  s1: [--num-layers, 2]", "  s1: [--num-layers, 2, --eval-iters, 0]",
         r"size s1, budget short: --eval-iters 0 leaves no final validation loss"),
        ("  s1: [--num-layers, 2]", "  s1: [--mhc-variant, hc]",
         r"sizes.s1: remove --mhc-variant: list the variants under 'variants'"),
        ("  s1: [--num-layers, 2]", "  s1: [--sequence-parallel, yes]",
         r"sizes.s1\[1\] = True is not a string or a number: quote it"),
        ("recipe: tiny", "recipe: tiny\nenv: {VARIANT: mhc}", r"env.VARIANT is set by the sweep"),
        ("recipe: tiny", "recipe: tiny\nbaseline: hc",
         r"baseline 'hc' is not among the variants \['residual', 'mhc'\]: add it"),
        ("recipe: tiny", "recipe: tiny\nslurm: {array: 0-3}",
         r"slurm.array: the sweep sets --array itself: remove it"),
        ("recipe: tiny\n", "", r"sizes.s1: no recipe: add a top-level 'recipe: tiny'"),
    ],
)  # fmt: skip
def test_bad_grid_files_say_which_key_and_what_to_change(tmp_path, old, new, message):
    assert old in GOOD
    path = tmp_path / "grid.yaml"
    path.write_text(GOOD.replace(old, new, 1))
    with pytest.raises(SweepError, match=message) as error:
        load_grid(path)
    assert str(error.value).startswith(f"{path}: ")  # names the file


def test_good_grid_and_the_example_plan(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(GOOD)
    grid = load_grid(path)
    assert grid.out_dir == REPO_ROOT / "runs" / "scaling-grid"  # default from the file name
    assert grid.baseline == "residual"
    example = load_grid(EXAMPLE_GRID, tmp_path)
    runs = plan(example, quiet=True)
    assert [r.name for r in runs] == ORDER
    # Later arguments override earlier ones: common, then size, then budget.
    assert runs[7].args[-2:] == ("--train-iters", "40")
    assert runs[7].env["VARIANT"] == "mhc" and runs[7].env["CPU"] == "1"
    assert runs[7].env["OUT_DIR"] == str(tmp_path / "runs" / "s2-long-mhc")


def test_cli_errors_exit_2_with_the_message(tmp_path):
    """Through tools/scaling_sweep.py: the entry point returns the exit code of the error."""
    path = tmp_path / "grid.yaml"
    path.write_text(GOOD.replace("[residual, mhc]", "[residual, mhcc]"))
    proc = cli("plan", path)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {path}: variants[1] = 'mhcc' is not a variant")
