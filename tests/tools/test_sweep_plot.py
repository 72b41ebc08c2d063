"""The sweep's figure: point labels clear of each other, readable log ticks, the PNG written."""

import math
import re

import pytest

from mhc_megatron.sweep.fit import fit_variants, gaps_to_baseline
from mhc_megatron.sweep.grid import Grid, load_grid
from mhc_megatron.sweep.plot import POINT_LABEL_GID, plain_number, plot, scaling_figure
from tests.tools.sweep_helpers import (
    EXAMPLE_GRID,
    EXAMPLE_RESULTS,
    PNG_MAGIC,
    read_rows,
    result_rows,
)

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
    return {"variants": list(factor), "sizes": ["s1", "s2", "s3"], "rows": result_rows(points)}


def _example_sweep() -> dict:
    rows = read_rows(EXAMPLE_RESULTS / "results.csv")
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
    fits, _ = fit_variants(rows)
    gaps = gaps_to_baseline(rows, fits, "residual")
    grid = Grid(
        path=tmp_path / f"{sweep_data}.yaml",
        out_dir=tmp_path,
        variants=data["variants"],
        baseline="residual",
        sizes={size: ("tiny", []) for size in data["sizes"]},
        budgets={},
    )
    fig = scaling_figure(grid, rows, fits, gaps)
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
        labels = [t for t in axes.texts if t.get_gid() == POINT_LABEL_GID]
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
    grid = load_grid(EXAMPLE_GRID, tmp_path)
    path = plot(grid)
    assert path == tmp_path / "scaling.png"
    assert path.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.9, "0.9"), (3.0, "3"), (1500.0, "1500"), (2e10, "2e10"), (1e15, "1e15"),
     (3.99767e8, "4e8"), (2.47822e8, "2.48e8"), (1.5e-05, "1.5e-5"), (9999.9, "1e4")],
)  # fmt: skip
def test_numbers_on_the_plot_are_plain(value, text):
    assert plain_number(value) == text
