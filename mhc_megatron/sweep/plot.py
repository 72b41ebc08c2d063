"""The figure of a sweep: loss against compute with the fitted laws, and the gaps to the baseline.

Its text stays readable at any spread of the points: log axes carry plain-number ticks that do
not crowd, and one label per size and budget names the points, placed clear of the other labels,
the points, the drawn lines and the legend.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mhc_megatron.sweep.grid import Grid
from mhc_megatron.sweep.results import read_csv

PLOT_DPI = 120  # drawn and saved at the same resolution: the label placement is in pixels
POINT_LABEL_GID = "point-label"  # the gid of the (size, budget) labels next to the points
LABEL_FONTSIZE = 7
# Major (labelled) tick choices on a log axis, densest first: the first whose labels are at
# least TICK_GAP_PT apart and at least 2 of them in view wins. Mantissas within each decade,
# then decades only, then a stride over the decades, then linear steps for a view narrower
# than a factor of ~4 (no two log ticks in it).
LOG_SUBS = ((1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 3, 5), (1, 2, 5), (1, 3), (1,))
DECADE_NUMTICKS = (6, 4, 3)
LINEAR_NBINS = (6, 4, 3, 2)
TICK_GAP_PT = 4.0
LABEL_GAP_PT = 3.0  # between a point label and its points, other labels and the legend
LABEL_MERGE_PT = 30.0  # points of one size/budget closer than this share one label
# Where a label may go around its point, (x, y): +-1 just clear of the point (further on each
# ring), 0.5 half a label's width or height over. Above-right first: a falling fit line
# through the points stays clear of it.
LABEL_DIRECTIONS = np.array(
    [
        [1, 0, 0.5, -0.5, -1, 1, -1, 1, -1, 1, -1, 1, 0, 0.5, -0.5, -1],
        [1, 1, 1, 1, 1, 0, 0, 0.5, 0.5, -0.5, -0.5, -1, -1, -1, -1, -1],
    ]
)


def plain_number(value: float) -> str:
    """A tick label or coefficient as a plain number.

    0.01 <= |value| < 10,000 is written out (4 significant digits); anything else as a mantissa
    of up to 3 significant digits, 'e' and the exponent without '+' or leading zeros.

    Args:
        value: the number.

    Returns:
        e.g. 0.9 -> '0.9', 3.0 -> '3', 2e10 -> '2e10', 3.99767e8 -> '4e8', 1.5e-05 -> '1.5e-5'.
    """
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    text = f"{value:.4g}"
    if 1e-2 <= abs(value) < 1e4 and "e" not in text:
        return text
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _extents(artist, renderer) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of an artist's window extent, in display pixels."""
    box = artist.get_window_extent(renderer)
    return (box.x0, box.y0, box.x1, box.y1)


def _overlap_area(a: tuple[float, ...], b: tuple[float, ...], pad: float = 0.0) -> float:
    """Area in which box ``a`` grown by ``pad`` on every side intersects box ``b``.

    Args:
        a: (x0, y0, x1, y1).
        b: (x0, y0, x1, y1).
        pad: the margin kept around ``a``, same units.

    Returns:
        0.0 when the two are at least ``pad`` apart.
    """
    width = min(a[2] + pad, b[2]) - max(a[0] - pad, b[0])
    height = min(a[3] + pad, b[3]) - max(a[1] - pad, b[1])
    return max(width, 0.0) * max(height, 0.0)


def _overlap_areas(boxes: np.ndarray, others: np.ndarray, pad: float) -> np.ndarray:
    """``_overlap_area`` of every box with every other box.

    Args:
        boxes: [c, 4] (x0, y0, x1, y1), grown by ``pad`` on every side.
        others: [m, 4] (x0, y0, x1, y1); m may be 0.
        pad: the margin kept around ``boxes``.

    Returns:
        [c, m] intersection areas.
    """
    if len(others) == 0:
        return np.zeros((len(boxes), 0))
    b, o = boxes[:, None, :], others[None, :, :]
    width = np.minimum(b[..., 2] + pad, o[..., 2]) - np.maximum(b[..., 0] - pad, o[..., 0])
    height = np.minimum(b[..., 3] + pad, o[..., 3]) - np.maximum(b[..., 1] - pad, o[..., 1])
    return np.maximum(width, 0.0) * np.maximum(height, 0.0)


def _visible_tick_labels(axis) -> list:
    """The major tick labels of a matplotlib axis inside its view limits, as last drawn.

    Args:
        axis: ``ax.xaxis`` or ``ax.yaxis`` of a figure drawn at least once.

    Returns:
        the ``Text`` of every visible major tick label inside the view, in tick order.
    """
    lo, hi = sorted(axis.get_view_interval())
    slack = 1e-9 * (hi - lo)
    return [
        tick.label1
        for tick in axis.get_major_ticks()
        if lo - slack <= tick.get_loc() <= hi + slack and tick.label1.get_visible()
    ]


def _log_tick_locators():
    """The major tick locators tried on a log axis, densest first (LOG_SUBS)."""
    from matplotlib.ticker import LogLocator, MaxNLocator

    for subs in LOG_SUBS:
        yield LogLocator(subs=subs)
    for numticks in DECADE_NUMTICKS:
        yield LogLocator(subs=(1.0,), numticks=numticks)
    for nbins in LINEAR_NBINS:
        yield MaxNLocator(nbins=nbins, steps=[1, 2, 2.5, 5, 10])


def _readable_log_ticks(axis, renderer) -> None:
    """Labels a log axis with plain numbers that do not crowd each other.

    Major ticks: the densest of ``_log_tick_locators`` with at least 2 labels in view, each at
    least TICK_GAP_PT from the next, formatted by ``plain_number``. Minor ticks: every mantissa,
    unlabelled (matplotlib's default labels some of them on a short axis, in mathtext, next to
    the major labels). Measured on the current layout of the figure.

    Args:
        axis: ``ax.xaxis`` or ``ax.yaxis`` on a log scale.
        renderer: the figure canvas's renderer.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda value, _pos: plain_number(value)))
    axis.set_minor_locator(LogLocator(subs="auto"))
    axis.set_minor_formatter(NullFormatter())
    pad = TICK_GAP_PT * axis.figure.dpi / 72
    for locator in _log_tick_locators():
        axis.set_major_locator(locator)
        axis.get_tightbbox(renderer)  # places and formats the ticks in view
        labels = _visible_tick_labels(axis)
        boxes = [_extents(label, renderer) for label in labels]
        crowded = any(
            _overlap_area(a, b, pad) > 0 for i, a in enumerate(boxes) for b in boxes[i + 1 :]
        )
        if len(labels) >= 2 and all(label.get_text() for label in labels) and not crowded:
            return
    axis.set_major_locator(LogLocator(subs=(1.0,), numticks=DECADE_NUMTICKS[-1]))


def _freeze_legend(legend, renderer) -> None:
    """Pins a legend placed by loc='best' where it is, so later labels can keep clear of it."""
    box = legend.get_window_extent(renderer)
    x0, y0 = legend.axes.transAxes.inverted().transform((box.x0, box.y0))
    legend.set_loc((float(x0), float(y0)))


def _clusters(named: list[tuple[str, np.ndarray]], merge_px: float) -> list[tuple[str, np.ndarray]]:
    """Joins the points of one name that lie within ``merge_px`` of each other (a chain counts).

    Args:
        named: (name, [2] display position) per point.
        merge_px: the largest distance between joined points, pixels.

    Returns:
        (name, [k, 2] positions) per cluster, in the order of their first point.
    """
    clusters: list[tuple[str, list[np.ndarray]]] = []
    for name, xy in named:
        near = [
            c
            for c in clusters
            if c[0] == name and min(np.hypot(*(xy - p)) for p in c[1]) <= merge_px
        ]
        merged = (name, [xy] + [p for c in near for p in c[1]])
        clusters = [c for c in clusters if not any(c is n for n in near)] + [merged]
    return [(name, np.array(points)) for name, points in clusters]


def _label_points(ax, named: list[tuple[str, tuple[float, float]]], renderer) -> list:
    """Names the points of an axes with labels that keep clear of each other.

    Points of one name closer than LABEL_MERGE_PT (the variants of one size and budget at almost
    the same compute and loss) share one label. Each label takes the spot nearest its points
    that is inside the axes and LABEL_GAP_PT clear of every point, of the labels placed before
    it and of the legend; a drawn line (a fit, the zero line) through a spot counts as one label
    height of distance. With no such spot: the one that overlaps least.

    Args:
        ax: the axes, laid out (the figure drawn once, its layout frozen).
        named: (label text, (x, y) in data coordinates) per point.
        renderer: the figure canvas's renderer.

    Returns:
        the label annotations, gid POINT_LABEL_GID.
    """
    pt = ax.figure.dpi / 72
    gap = LABEL_GAP_PT * pt
    half = (ax.lines[0].get_markersize() / 2 if ax.lines else 3.0) * pt + 1.0
    display = [(name, ax.transData.transform(xy)) for name, xy in named]
    hard = [(x - half, y - half, x + half, y + half) for _, (x, y) in display]
    legend = ax.get_legend()
    if legend is not None:
        hard.append(_extents(legend, renderer))
    inside = (ax.bbox.x0 + 2 * pt, ax.bbox.y0 + 2 * pt, ax.bbox.x1 - 2 * pt, ax.bbox.y1 - 2 * pt)
    curves = []  # the drawn lines, every ~2 px
    for line in ax.get_lines():
        if line.get_linestyle() in ("None", "none", " ", ""):
            continue
        xy = line.get_transform().transform(line.get_xydata())
        for a, b in zip(xy[:-1], xy[1:], strict=True):
            steps = max(2, int(np.hypot(*(b - a)) / 2) + 1)
            curves.append(a + np.linspace(0, 1, steps)[:, None] * (b - a))
    curve = np.concatenate(curves) if curves else np.zeros((0, 2))
    placed = []
    clusters = _clusters(display, LABEL_MERGE_PT * pt)
    for name, points in sorted(clusters, key=lambda c: c[1][:, 0].min()):
        text = ax.annotate(
            name,
            xy=ax.transData.inverted().transform(points[0]),
            xytext=(0, 0),
            textcoords="offset points",
            ha="center",
            va="center",
            fontsize=LABEL_FONTSIZE,
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.7},
            gid=POINT_LABEL_GID,
        )
        text.set_in_layout(False)
        x0, y0, x1, y1 = _extents(text, renderer)
        w, h = x1 - x0, y1 - y0
        # Candidate centres around each point, LABEL_DIRECTIONS on rings further and further out.
        ring = np.arange(10.0)[:, None]
        dx = half + gap + w / 2 + ring * w / 3
        dy = half + gap + h / 2 + ring * h / 2
        ux, uy = LABEL_DIRECTIONS
        offsets = np.stack(
            [np.where(abs(ux) == 1, ux * dx, ux * w), np.where(abs(uy) == 1, uy * dy, uy * h)],
            axis=-1,
        ).reshape(-1, 2)  # [rings x directions, 2], nearest ring first
        centres = (points[:, None, :] + offsets[None]).reshape(-1, 2)
        boxes = np.hstack([centres - (w / 2, h / 2), centres + (w / 2, h / 2)])  # [c, 4]
        out = np.maximum(w * h - _overlap_areas(boxes, np.array([inside]), 0.0)[:, 0], 0.0)
        clash = _overlap_areas(boxes, np.array(hard + placed), gap).sum(axis=1)
        crossed = (
            (curve[None, :, 0] >= boxes[:, None, 0] - 1)
            & (curve[None, :, 0] <= boxes[:, None, 2] + 1)
            & (curve[None, :, 1] >= boxes[:, None, 1] - 1)
            & (curve[None, :, 1] <= boxes[:, None, 3] + 1)
        ).any(axis=1)
        off_x = np.maximum(
            boxes[:, None, 0] - points[None, :, 0], points[None, :, 0] - boxes[:, None, 2]
        )
        off_y = np.maximum(
            boxes[:, None, 1] - points[None, :, 1], points[None, :, 1] - boxes[:, None, 3]
        )
        near = np.hypot(np.maximum(off_x, 0), np.maximum(off_y, 0)).min(axis=1)
        # Clear spots first (ties: the first, nearest ring), then the nearest.
        best = np.lexsort((near + h * crossed, np.round(10 * out + clash, 3)))[0]
        cx, cy = centres[best]
        text.set_position(((cx - points[0][0]) / pt, (cy - points[0][1]) / pt))
        placed.append(_extents(text, renderer))
    return [t for t in ax.texts if t.get_gid() == POINT_LABEL_GID]


def scaling_figure(grid: Grid, rows: list[dict], fits: list[dict], gaps: list[dict]):
    """Draws loss vs compute with the fitted laws, and the gaps to the baseline.

    Left: the final validation loss of every finished run against its compute (log-log), one
    colour per variant, one marker per size, and each variant's fitted ``L = a C^-b`` over its
    compute range x/1.5 .. x1.5. Right: each variant's loss minus the baseline's at every size
    and budget both finished. One label per size and budget names its points (the variants of a
    size and budget sit close together), placed clear of the other labels, the points and the
    legend; log axes carry plain-number ticks that do not crowd (``_readable_log_ticks``).

    Args:
        grid: the grid (name, variants, sizes, baseline).
        rows: results.csv rows (finished and not; only the finished are drawn).
        fits: fit.csv rows.
        gaps: gaps.csv rows.

    Returns:
        the ``matplotlib.figure.Figure`` on an Agg canvas, drawn and laid out (layout frozen).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in rows if r["status"] == "finished"]
    fits = {f["variant"]: f for f in fits}
    fig = Figure(figsize=(12, 4.8), dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax, ax_gap = fig.subplots(1, 2)
    colors = {v: f"C{i}" for i, v in enumerate(grid.variants)}
    markers = dict(zip(grid.sizes, "osD^vP*Xh", strict=False))
    named: list[tuple[str, tuple[float, float]]] = []
    for variant in grid.variants:
        for r in (r for r in rows if r["variant"] == variant):
            xy = (float(r["compute_flops"]), float(r["final_val_loss"]))
            ax.loglog(*xy, ls="none", marker=markers.get(r["size"], "o"), color=colors[variant])
            named.append((f"{r['size']}/{r['budget']}", xy))
        label = variant
        if variant in fits:
            f = fits[variant]
            a, b = float(f["a"]), float(f["b"])
            c = np.geomspace(float(f["compute_min"]) / 1.5, float(f["compute_max"]) * 1.5, 50)
            label = f"{variant}: L = {plain_number(a)} C^-{b:.4f} (R²={float(f['r2']):.3f})"
            ax.loglog(c, a * c**-b, color=colors[variant], lw=1.2)
        ax.plot([], [], color=colors[variant], marker="o", label=label)
    ax.set(
        xlabel="compute C = 6·N_active·D (FLOPs)",
        ylabel="final validation loss (nats)",
        title=f"{grid.path.stem}: loss vs compute",
    )
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    gap_named: list[tuple[str, tuple[float, float]]] = []
    if gaps:
        for variant in dict.fromkeys(g["variant"] for g in gaps):
            mine = [g for g in gaps if g["variant"] == variant]
            ax_gap.semilogx(
                [float(g["compute_flops"]) for g in mine],
                [float(g["gap"]) for g in mine],
                ls="none",
                marker="o",
                color=colors.get(variant, "k"),
                label=f"{variant} - {grid.baseline}",
            )
            for g in mine:
                xy = (float(g["compute_flops"]), float(g["gap"]))
                gap_named.append((f"{g['size']}/{g['budget']}", xy))
        ax_gap.axhline(0.0, color="k", lw=0.8)
        ax_gap.legend(fontsize=8)
    else:
        ax_gap.text(
            0.5,
            0.5,
            "no gaps: no baseline with a finished run of the same size and budget",
            ha="center",
            va="center",
            transform=ax_gap.transAxes,
            fontsize=8,
        )
    ax_gap.set(
        xlabel="compute (FLOPs)",
        ylabel="loss - baseline loss (nats; < 0: better)",
        title="gap to the baseline at each size/budget",
    )
    ax_gap.grid(True, which="both", alpha=0.3)

    # Ticks change the layout, the layout moves the points: ticks, then the layout (frozen),
    # then the labels in the pixels they will be saved at.
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for axis in (ax.xaxis, ax.yaxis, ax_gap.xaxis, ax_gap.yaxis):
        if axis.get_scale() == "log":
            _readable_log_ticks(axis, renderer)
    fig.canvas.draw()
    fig.set_layout_engine("none")
    for axes, points in ((ax, named), (ax_gap, gap_named)):
        if axes.get_legend() is not None:
            _freeze_legend(axes.get_legend(), renderer)
        if points:
            _label_points(axes, points, renderer)
    return fig


def plot(grid: Grid) -> Path:
    """results.csv + fit.csv + gaps.csv -> scaling.png: loss vs compute, and the gaps.

    Returns:
        the path of scaling.png.
    """
    fig = scaling_figure(
        grid,
        read_csv(grid.out_dir / "results.csv", "collect"),
        read_csv(grid.out_dir / "fit.csv", "fit"),
        read_csv(grid.out_dir / "gaps.csv", "fit"),
    )
    path = grid.out_dir / "scaling.png"
    fig.savefig(path, dpi=PLOT_DPI)
    print(f"-> {path}")
    return path
