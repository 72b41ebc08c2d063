"""tools/scaling_sweep.py: the power-law fit on known points, the grid file's errors, the plot's
labels and ticks, a tiny grid trained on CPU end to end (local runs, one SLURM array task run by
hand, resume) and the SLURM submission with a stand-in sbatch."""

import csv
import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.launching import REPO_ROOT, free_port

TOOL = REPO_ROOT / "tools" / "scaling_sweep.py"
_spec = importlib.util.spec_from_file_location("scaling_sweep", TOOL)
sweep = importlib.util.module_from_spec(_spec)
sys.modules["scaling_sweep"] = sweep  # dataclasses look their module up there
_spec.loader.exec_module(sweep)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# 2 sizes x 2 budgets x 2 variants = 8 planned runs, of which the end-to-end test trains 5: the
# four short ones locally and s1-long-residual as a SLURM array task run by hand. The rest stay
# unfinished on purpose: the fit must use what finished and name what is missing. Tiny and few
# steps: each run is ~15 s of start-up. --save '' skips the checkpoint (~4 s a run); Megatron's
# argument check still wants a --save-interval with it. --load '' goes with it: run.sh's --load
# of a checkpoint directory that will never exist is refused.
E2E_GRID = """
recipe: tiny
cpu: true
variants: [residual, mhc]
sizes:
  s1: [--num-layers, 2, --moe-layer-freq, "([0]*1+[1]*1)", --hidden-size, 32]
  s2: [--num-layers, 2, --moe-layer-freq, "([0]*1+[1]*1)", --hidden-size, 64]
budgets:
  short: [--train-iters, 4]
  long: [--train-iters, 8]
args: [--lr-warmup-iters, 1, --eval-interval, 1000, --eval-iters, 1, --log-interval, 2,
       --save, "", --load, "", --save-interval, 1000]
"""
ORDER = [
    f"{s}-{b}-{v}" for s in ("s1", "s2") for b in ("short", "long") for v in ("residual", "mhc")
]
LOCAL = ["s1-short-residual", "s1-short-mhc", "s2-short-residual", "s2-short-mhc"]
ARRAY_TASK = "s1-long-residual"
FINISHED = [*LOCAL, ARRAY_TASK]
RUN_TIMEOUT_S = 240  # per training run (the tool kills the process group): ~15-40 s each


def _env(**extra) -> dict:
    """The test process's environment minus what would change the runs."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "VARIANT",
            "TP",
            "PP",
            "EP",
            "TRAIN_ITERS",
            "NNODES",
            "MASTER_ADDR",
            "MASTER_PORT",
            "TRITON_INTERPRET",  # set by conftest.py for the kernel tests only
            "SLURM_ARRAY_TASK_ID",
            "SLURM_ARRAY_JOB_ID",
        )
    }
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def _cli(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)],
        cwd=REPO_ROOT,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------
# (a) the fit on known points


def test_fit_recovers_an_exact_power_law():
    compute = np.geomspace(1e15, 1e21, 7)
    a, b = 25.0, 0.07
    fa, fb, r2 = sweep.fit_power_law(compute, a * compute**-b)
    # Exact data: only float64 rounding. a is exp(intercept) at log C = 0, ~35-48 units of log C
    # left of the data, which amplifies the rounding of the slope by that much.
    assert fb == pytest.approx(b, abs=1e-10)
    assert fa == pytest.approx(a, rel=1e-8)
    assert r2 == pytest.approx(1.0, abs=1e-12)


def test_fit_with_noise_stays_within_its_standard_errors():
    rng = np.random.default_rng(0)
    compute = np.geomspace(1e15, 1e21, 25)
    a, b, sigma = 25.0, 0.07, 0.003  # 0.3% multiplicative noise on the loss
    loss = a * compute**-b * np.exp(sigma * rng.standard_normal(compute.size))
    fa, fb, r2 = sweep.fit_power_law(compute, loss)
    # Least-squares standard errors in log space: se(slope) = sigma / sqrt(Sxx) and
    # se(intercept) = sigma * sqrt(1/n + mean(x)^2 / Sxx). 4 standard errors: a false failure
    # once in ~16,000 draws, and the seed is fixed anyway.
    x = np.log(compute)
    sxx = np.sum((x - x.mean()) ** 2)
    se_b = sigma / math.sqrt(sxx)
    se_log_a = sigma * math.sqrt(1 / x.size + x.mean() ** 2 / sxx)
    assert 4 * se_b < 1e-3  # a tight bound: b = 0.07 to better than 1.5%
    assert abs(fb - b) < 4 * se_b
    assert abs(math.log(fa) - math.log(a)) < 4 * se_log_a
    assert r2 > 0.99


def _result_rows(points: dict[tuple[str, str, str], tuple[float, float]]) -> list[dict]:
    """results.csv rows: {(size, budget, variant): (compute, loss)}; NaN loss = unfinished."""
    rows = []
    for (size, budget, variant), (compute, loss) in points.items():
        done = not math.isnan(loss)
        rows.append(
            {
                "name": f"{size}-{budget}-{variant}",
                "size": size,
                "budget": budget,
                "variant": variant,
                "status": "finished" if done else "unfinished",
                "compute_flops": repr(compute) if done else "",
                "final_val_loss": repr(loss) if done else "",
            }
        )
    return rows


def test_fit_per_variant_and_the_gap_to_the_baseline():
    """The baseline on an exact law, mHC 2% below it at the same compute: the gaps, the compute
    ratio (1/0.98)^(1/b), and a variant left with one finished run is refused, by name."""
    a, b = 30.0, 0.1
    sizes = {"s1": 1e18, "s2": 4e18, "s3": 1.6e19}
    points = {}
    for size, c in sizes.items():
        points[(size, "d", "residual")] = (c, a * c**-b)
        points[(size, "d", "mhc")] = (c, 0.98 * a * c**-b)
        points[(size, "d", "hc")] = (c, 0.99 * a * c**-b if size == "s1" else math.nan)
    rows = _result_rows(points)
    fits, notes = sweep.fit_variants(rows)
    by_variant = {f["variant"]: f for f in fits}
    assert set(by_variant) == {"residual", "mhc"}
    # fit_variants writes 6 significant digits.
    assert float(by_variant["residual"]["b"]) == pytest.approx(b, rel=1e-5)
    assert float(by_variant["residual"]["a"]) == pytest.approx(a, rel=1e-5)
    assert float(by_variant["mhc"]["a"]) == pytest.approx(0.98 * a, rel=1e-5)
    assert by_variant["mhc"]["points"] == 3
    assert any("hc: left out" in n and "s2-d-hc" in n and "s3-d-hc" in n for n in notes)
    assert any(n.startswith("hc: not fitted") and "needs at least 2" in n for n in notes)

    gaps = sweep.gaps_to_baseline(rows, fits, "residual")
    mhc_gaps = {g["size"]: g for g in gaps if g["variant"] == "mhc"}
    assert set(mhc_gaps) == set(sizes)
    for size, c in sizes.items():
        g = mhc_gaps[size]
        assert float(g["gap"]) == pytest.approx(-0.02 * a * c**-b, rel=1e-5)
        assert float(g["rel_gap"]) == pytest.approx(-0.02, rel=1e-5)
        assert float(g["baseline_compute_ratio"]) == pytest.approx((1 / 0.98) ** (1 / b), rel=1e-4)
    hc_gaps = [g for g in gaps if g["variant"] == "hc"]
    assert [g["size"] for g in hc_gaps] == ["s1"]  # only where both finished
    assert float(hc_gaps[0]["rel_gap"]) == pytest.approx(-0.01, rel=1e-5)
    assert sweep.gaps_to_baseline(rows, fits, None) == []


LOG = """
------------------------ arguments ------------------------
  global_batch_size ............................... 4
  rampup_batch_size ............................... None
  seq_length ...................................... 128
-------------------- end of arguments ---------------------
 [2026-11-23 22:05:51] iteration        5/      10 | consumed samples:           20 | lm loss: 5.8 |
 [2026-11-23 22:05:52] iteration       10/      10 | consumed samples:           40 | lm loss: 5.2 |
 validation loss at iteration 10 | lm loss value: 5.200000E+00 | lm loss PPL: 1.8E+02 |
 validation loss at iteration 10 on validation set | lm loss value: 5.151773E+00 | lm loss PPL: 1 |
 validation loss at iteration 10 on test set | lm loss value: 5.119886E+00 | lm loss PPL: 1 |
"""


def test_parse_log_reads_the_final_validation_loss_and_the_tokens():
    result = sweep.parse_log(LOG)
    # The end-of-training evaluation on the validation set: not the in-training one, not test.
    assert result == {
        "iterations": 10,
        "samples": 40,
        "seq_length": 128,
        "tokens": 40 * 128,
        "final_val_loss": 5.151773,
    }
    # Last iteration not logged: iterations x global batch.
    unlogged = LOG.replace("iteration       10/", "iteration        9/")
    assert sweep.parse_log(unlogged)["samples"] == 40
    assert sweep.parse_log(LOG.replace("5.151773E+00", "NAN"))["final_val_loss"] != 0  # NaN
    assert sweep.parse_log(LOG.split(" validation loss at iteration 10 on")[0]) is None


# --------------------------------------------------------------------------------------------
# (b) the grid file's errors say what to change

GOOD = """
recipe: tiny
variants: [residual, mhc]
sizes:
  s1: [--num-layers, 2]
budgets:
  short: [--train-iters, 20]
"""


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
    with pytest.raises(sweep.SweepError, match=message) as error:
        sweep.load_grid(path)
    assert str(error.value).startswith(f"{path}: ")  # names the file


def test_good_grid_and_the_example_plan(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(GOOD)
    grid = sweep.load_grid(path)
    assert grid.out_dir == REPO_ROOT / "runs" / "scaling-grid"  # default from the file name
    assert grid.baseline == "residual"
    example = sweep.load_grid(REPO_ROOT / "examples" / "scaling" / "tiny_grid.yaml", tmp_path)
    runs = sweep.plan(example, quiet=True)
    assert [r.name for r in runs] == ORDER
    # Later arguments override earlier ones: common, then size, then budget.
    assert runs[7].args[-2:] == ("--train-iters", "40")
    assert runs[7].env["VARIANT"] == "mhc" and runs[7].env["CPU"] == "1"
    assert runs[7].env["OUT_DIR"] == str(tmp_path / "runs" / "s2-long-mhc")


def test_cli_errors_exit_2_with_the_message(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(GOOD.replace("[residual, mhc]", "[residual, mhcc]"))
    proc = _cli("plan", path)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {path}: variants[1] = 'mhcc' is not a variant")


def test_a_failed_run_is_named_with_its_log_and_nothing_is_fitted(tmp_path):
    """NNODES=2 without MASTER_ADDR: run.sh stops before Python starts (a cheap real failure)."""
    path = tmp_path / "grid.yaml"
    path.write_text(GOOD.replace("[residual, mhc]", "[residual]") + "cpu: true\nenv: {NNODES: 2}\n")
    proc = _cli("all", path, "--out", tmp_path / "out", "--timeout", 60)
    log = tmp_path / "out" / "runs" / "s1-short-residual" / "train.log"
    assert proc.returncode == 2, proc.stdout + proc.stderr  # fit refuses: nothing finished
    assert "FAILED s1-short-residual in" in proc.stdout
    assert "MASTER_ADDR (the first node) is needed" in proc.stdout and str(log) in proc.stdout
    assert f"  s1-short-residual: {log}" in proc.stderr  # the summary of failures
    assert "unfinished" in proc.stdout  # collect
    assert "residual: not fitted: 0 finished run(s)" in proc.stderr
    assert "error: no variant has 2 finished runs" in proc.stderr
    rows = _rows(tmp_path / "out" / "results.csv")
    assert [(r["name"], r["status"], r["final_val_loss"]) for r in rows] == [
        ("s1-short-residual", "unfinished", "")
    ]


def test_a_run_trained_with_other_settings_is_not_reused(tmp_path):
    """The grid changed after a run finished (another --train-iters): refused, saying what to do.
    An unfinished run without a checkpoint may be relaunched with the new settings."""
    path = tmp_path / "grid.yaml"
    path.write_text(GOOD)
    run = sweep.plan(sweep.load_grid(path, tmp_path / "out"), quiet=True)[0]
    Path(run.run_dir).mkdir(parents=True)
    old = [a if a != "20" else "10" for a in run.command()]
    header = f"{sweep.COMMAND_HEADER}{shlex.join(old)}\n"
    Path(run.log).write_text(header + LOG)
    message = (
        rf"run s1-short-residual in {run.run_dir} was launched with other settings than the "
        rf"grid now gives it:\n  then: .*--train-iters 10\n  now:  .*--train-iters 20\n"
        rf"delete {run.run_dir} to train it again"
    )
    with pytest.raises(sweep.SweepError, match=message):
        sweep._read_result(run)
    unfinished = LOG.split(" validation loss at iteration 10 on")[0]
    Path(run.log).write_text(header + unfinished)
    assert sweep._read_result(run) is None
    tracker = Path(run.run_dir, "checkpoints", "latest_checkpointed_iteration.txt")
    tracker.parent.mkdir()
    tracker.write_text("5")  # it would resume from there with the other settings
    with pytest.raises(sweep.SweepError, match="launched with other settings"):
        sweep._read_result(run)
    # The same settings from another checkout and output directory: the same run.
    moved = [a.replace(str(REPO_ROOT), "/elsewhere") for a in run.command()]
    Path(run.log).write_text(f"{sweep.COMMAND_HEADER}{shlex.join(moved)}\n{LOG}")
    assert sweep._read_result(run)["final_val_loss"] == 5.151773


# --------------------------------------------------------------------------------------------
# (p) the plot: labels and ticks that can be read


EXAMPLE_RESULTS = REPO_ROOT / "examples" / "scaling" / "results"
TICK_LABEL_RE = re.compile(r"^\d+(\.\d+)?(e-?\d+)?$")  # 0.9, 3, 2e10, 1.5e-5: no mathtext


def _synthetic_sweep(size_step: float, budget_step: float) -> dict:
    """3 sizes x 3 budgets x 3 variants near L = 30 C^-0.05: mHC 1% and HC 0.5% below the
    residual, on ~20% / ~10% more compute (their extra parameters), so that the variants of one
    size and budget crowd each other, and with steps of similar size the groups crowd too (size
    i with budget j+1 next to size i+1 with budget j)."""
    factor = {"residual": (1.0, 1.0), "mhc": (1.2, 0.99), "hc": (1.1, 0.995)}
    points = {}
    for i, size in enumerate(("s1", "s2", "s3")):
        for j, budget in enumerate(("short", "mid", "long")):
            for variant, (more, less) in factor.items():
                c = 1e18 * size_step**i * budget_step**j * more
                points[(size, budget, variant)] = (c, less * (1 + 0.002 * i) * 30.0 * c**-0.05)
    points[("s3", "long", "hc")] = (math.nan, math.nan)  # unfinished: no point, no gap
    return {"variants": list(factor), "sizes": ["s1", "s2", "s3"], "rows": _result_rows(points)}


def _example_sweep() -> dict:
    rows = _rows(EXAMPLE_RESULTS / "results.csv")
    return {
        "variants": list(dict.fromkeys(r["variant"] for r in rows)),
        "sizes": list(dict.fromkeys(r["size"] for r in rows)),
        "rows": rows,
    }


def _in_view(axis, ticks) -> list:
    lo, hi = sorted(axis.get_view_interval())
    return [t.label1 for t in ticks if lo * (1 - 1e-9) <= t.get_loc() <= hi * (1 + 1e-9)]


def _overlapping(boxes) -> list[tuple[int, int]]:
    return [
        (i, j)
        for i, a in enumerate(boxes)
        for j, b in enumerate(boxes[i + 1 :], i + 1)
        if a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1
    ]


@pytest.mark.parametrize("sweep_data", ["narrow", "wide", "example"])
def test_plot_labels_do_not_overlap_and_log_ticks_are_readable(tmp_path, sweep_data):
    """Dense labels (3 variants per size and budget, groups ~10% apart in compute) on log axes
    of ~1.4 and ~6 decades, and the committed example results: every point with a label of its
    size/budget within 0.75 inch, no two labels (or a label and the legend) intersecting, labels
    inside their axes; on every log axis at least 2 plain-number major tick labels in view, none
    intersecting the next, and no minor tick labels."""
    if sweep_data == "example":
        data = _example_sweep()
    else:
        data = _synthetic_sweep(*((2.2, 2.0) if sweep_data == "narrow" else (30.0, 25.0)))
    rows = data["rows"]
    fits, _ = sweep.fit_variants(rows)
    gaps = sweep.gaps_to_baseline(rows, fits, "residual")
    grid = sweep.Grid(
        path=tmp_path / f"{sweep_data}.yaml",
        out_dir=tmp_path,
        variants=data["variants"],
        baseline="residual",
        sizes={size: ("tiny", []) for size in data["sizes"]},
        budgets={},
    )
    fig = sweep.scaling_figure(grid, rows, fits, gaps)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax, ax_gap = fig.axes
    points = {  # (name, x, y) of every point drawn
        ax: [
            (f"{r['size']}/{r['budget']}", float(r["compute_flops"]), float(r["final_val_loss"]))
            for r in rows
            if r["status"] == "finished"
        ],
        ax_gap: [
            (f"{g['size']}/{g['budget']}", float(g["compute_flops"]), float(g["gap"])) for g in gaps
        ],
    }
    assert len(points[ax]) >= 7 and len(points[ax_gap]) >= 4
    for axes, named in points.items():
        labels = [t for t in axes.texts if t.get_gid() == sweep.POINT_LABEL_GID]
        boxes = [t.get_window_extent(renderer) for t in labels]
        assert {t.get_text() for t in labels} == {name for name, _, _ in named}
        for name, x, y in named:  # a label with its name at most 0.75 inch away
            px, py = axes.transData.transform((x, y))
            away = min(
                math.hypot(max(b.x0 - px, 0, px - b.x1), max(b.y0 - py, 0, py - b.y1))
                for t, b in zip(labels, boxes, strict=True)
                if t.get_text() == name
            )
            assert away <= 0.75 * fig.dpi, (name, away)
        legend = axes.get_legend()
        if legend is not None:
            boxes.append(legend.get_window_extent(renderer))
        clashes = _overlapping(boxes)
        assert not clashes, [
            (labels[i].get_text(), labels[j].get_text() if j < len(labels) else "legend")
            for i, j in clashes
        ]
        frame = axes.bbox
        for box in boxes:
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1, (box, frame)
            assert frame.y0 <= box.y0 and box.y1 <= frame.y1, (box, frame)
    for axis in (ax.xaxis, ax.yaxis, ax_gap.xaxis):
        assert axis.get_scale() == "log"
        labels = _in_view(axis, axis.get_major_ticks())
        texts = [t.get_text() for t in labels]
        assert len(texts) >= 2, texts
        assert all(TICK_LABEL_RE.match(text) for text in texts), texts
        assert not _overlapping([t.get_window_extent(renderer) for t in labels]), texts
        assert all(t.get_text() == "" for t in _in_view(axis, axis.get_minor_ticks()))
    if sweep_data == "wide":  # 6 decades: the decades, not every mantissa
        assert len(_in_view(ax.xaxis, ax.xaxis.get_major_ticks())) <= 8


def test_plot_writes_the_png_from_the_csvs(tmp_path):
    for name in ("results.csv", "fit.csv", "gaps.csv"):
        (tmp_path / name).write_bytes((EXAMPLE_RESULTS / name).read_bytes())
    grid = sweep.load_grid(REPO_ROOT / "examples" / "scaling" / "tiny_grid.yaml", tmp_path)
    path = sweep.plot(grid)
    assert path == tmp_path / "scaling.png"
    assert path.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.9, "0.9"), (3.0, "3"), (1500.0, "1500"), (2e10, "2e10"), (1e15, "1e15"),
     (3.99767e8, "4e8"), (2.47822e8, "2.48e8"), (1.5e-05, "1.5e-5"), (9999.9, "1e4")],
)  # fmt: skip
def test_numbers_on_the_plot_are_plain(value, text):
    assert sweep._number(value) == text


# --------------------------------------------------------------------------------------------
# (c, d) a tiny grid end to end on CPU, one run as a SLURM array task


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """Plans the grid, runs one array task by hand while the short runs train locally, then
    `all` (which must only skip), and a second `run` for the resume timing."""
    tmp = tmp_path_factory.mktemp("sweep")
    grid, out = tmp / "grid.yaml", tmp / "out"
    grid.write_text(E2E_GRID)
    info = {"grid": grid, "out": out}
    info["plan"] = _cli("plan", grid, "--out", out)
    assert info["plan"].returncode == 0, info["plan"].stderr

    index = ORDER.index(ARRAY_TASK)
    task_env = _env(SLURM_ARRAY_TASK_ID=str(index), SWEEP_MASTER_PORT=str(free_port()))
    task = subprocess.Popen(
        ["bash", str(out / "sweep.sbatch")],
        env=task_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        local = ["--local", "--jobs", 2, "--only", "*-short-*", "--timeout", RUN_TIMEOUT_S]
        info["run"] = _cli("run", grid, "--out", out, *local)
        info["task_output"] = task.communicate(timeout=RUN_TIMEOUT_S)[0]
        info["task_rc"] = task.returncode
    finally:
        if task.poll() is None:
            sweep.kill_tree(task)
            task.wait()
    logs = {name: (out / "runs" / name / "train.log").stat() for name in FINISHED}
    info["all"] = _cli("all", grid, "--out", out, "--only", *FINISHED)
    start = time.monotonic()
    info["rerun"] = _cli("run", grid, "--out", out, "--local", "--only", *FINISHED)
    info["rerun_s"] = time.monotonic() - start
    info["logs_untouched"] = all(
        (out / "runs" / name / "train.log").stat().st_mtime_ns == stat.st_mtime_ns
        for name, stat in logs.items()
    )
    return info


def test_array_script_is_valid_bash_with_one_task_per_run(e2e):
    script = (e2e["out"] / "sweep.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(e2e["out"] / "sweep.sbatch")]).returncode == 0
    assert subprocess.run(["bash", "-n", str(e2e["out"] / "collect.sbatch")]).returncode == 0
    assert f"#SBATCH --array=0-{len(ORDER) - 1}\n" in script
    lines = (e2e["out"] / "runs.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == ORDER
    assert f"{len(ORDER)} runs (2 sizes x 2 budgets x 2 variants)" in e2e["plan"].stdout


def test_one_array_task_runs_its_run_locally(e2e):
    assert e2e["task_rc"] == 0, e2e["task_output"][-3000:]
    log = e2e["out"] / "runs" / ARRAY_TASK / "train.log"
    assert f"run {ARRAY_TASK}: log {log}" in e2e["task_output"]
    text = log.read_text()
    assert "# scaling_sweep: array task 2 on" in text
    assert "recipe tiny, variant residual" in text  # run.sh's banner: the right run
    # Run again, the task sees its run finished and exits at once.
    again = subprocess.run(
        ["bash", str(e2e["out"] / "sweep.sbatch")],
        env=_env(SLURM_ARRAY_TASK_ID="2"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert again.returncode == 0 and f"run {ARRAY_TASK}: finished already" in again.stdout
    missing = subprocess.run(
        ["bash", str(e2e["out"] / "sweep.sbatch")],
        env=_env(SLURM_ARRAY_TASK_ID="8"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == 2 and "no run 8" in missing.stderr


def test_local_runs_then_all_collects_fits_and_plots(e2e):
    assert e2e["run"].returncode == 0, e2e["run"].stdout[-3000:] + e2e["run"].stderr[-3000:]
    assert all(f"done {name} in" in e2e["run"].stdout for name in LOCAL)
    proc = e2e["all"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all(f"skip {name}: finished" in proc.stdout for name in FINISHED)
    assert f"{len(FINISHED)} of {len(ORDER)} runs finished" in proc.stdout

    rows = {r["name"]: r for r in _rows(e2e["out"] / "results.csv")}
    assert list(rows) == ORDER  # every planned run, finished or not
    for name in ORDER:
        row = rows[name]
        if name in FINISHED:
            assert row["status"] == "finished"
            assert math.isfinite(float(row["final_val_loss"])) and float(row["compute_flops"]) > 0
            assert float(row["compute_flops"]) == pytest.approx(
                6 * int(row["active_params"]) * int(row["tokens"]), rel=1e-5
            )
        else:
            assert row["status"] == "not started" and row["final_val_loss"] == ""
            assert f"{name:<32} not started" in proc.stdout  # named, with its log
    compute = {name: float(rows[name]["compute_flops"]) for name in FINISHED}
    params = {name: int(rows[name]["active_params"]) for name in FINISHED}
    for variant in ("residual", "mhc"):  # grows with size
        assert compute[f"s2-short-{variant}"] > compute[f"s1-short-{variant}"]
        assert params[f"s2-short-{variant}"] > params[f"s1-short-{variant}"]
    # Grows with the budget: same model, twice the steps of 4 sequences of 128 tokens.
    assert params["s1-long-residual"] == params["s1-short-residual"]
    assert int(rows["s1-long-residual"]["tokens"]) == 8 * 4 * 128
    assert compute["s1-long-residual"] == pytest.approx(2 * compute["s1-short-residual"], rel=1e-5)
    assert params["s1-short-mhc"] > params["s1-short-residual"]  # the mHC parameters

    fits = {f["variant"]: f for f in _rows(e2e["out"] / "fit.csv")}
    assert set(fits) == {"residual", "mhc"}
    assert fits["residual"]["points"] == "3" and fits["mhc"]["points"] == "2"
    assert all(math.isfinite(float(f["b"])) and float(f["a"]) > 0 for f in fits.values())
    assert fits["mhc"]["left_out"] == "s1-long-mhc s2-long-mhc"
    assert "note: mhc: left out (unfinished or non-finite loss): s1-long-mhc" in proc.stderr
    gaps = _rows(e2e["out"] / "gaps.csv")
    assert [(g["size"], g["budget"], g["variant"]) for g in gaps] == [
        ("s1", "short", "mhc"),
        ("s2", "short", "mhc"),
    ]
    for g in gaps:
        loss = float(rows[f"{g['size']}-short-mhc"]["final_val_loss"])
        base = float(rows[f"{g['size']}-short-residual"]["final_val_loss"])
        assert float(g["gap"]) == pytest.approx(loss - base, abs=2e-6)  # 6 significant digits

    png = (e2e["out"] / "scaling.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_a_second_run_skips_the_finished_runs(e2e):
    proc = e2e["rerun"]
    assert proc.returncode == 0, proc.stderr
    assert all(f"skip {name}: finished" in proc.stdout for name in FINISHED)
    assert f"all {len(FINISHED)} runs finished" in proc.stdout
    assert e2e["logs_untouched"]
    assert e2e["rerun_s"] < 10  # a Python start and reading 5 logs; a run would take ~15 s+


def test_run_slurm_submits_the_unfinished_runs_then_the_collect_job(e2e, tmp_path):
    """A stand-in sbatch on PATH records its arguments: the array holds only the unfinished
    runs, and the collect job waits for it (afterany)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    fake = bin_dir / "sbatch"
    fake.write_text(
        textwrap.dedent(f"""\
        #!/bin/bash
        echo "$*" >> {calls}
        n=$(wc -l < {calls}); echo "$((1000 + n));cluster"
    """)
    )
    fake.chmod(0o755)
    env = _env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    proc = _cli("run", e2e["grid"], "--out", e2e["out"], "--slurm", env=env)
    assert proc.returncode == 0, proc.stderr
    unfinished = ",".join(str(ORDER.index(n)) for n in ORDER if n not in FINISHED)
    assert calls.read_text().splitlines() == [
        f"--parsable --array={unfinished} {e2e['out'] / 'sweep.sbatch'}",
        f"--parsable --dependency=afterany:1001 {e2e['out'] / 'collect.sbatch'}",
    ]
    assert "submitted array job 1001 (3 of 8 runs) and collect job 1002" in proc.stdout
    assert json.loads((e2e["out"] / "plan.json").read_text())["runs"][2]["name"] == ARRAY_TASK
