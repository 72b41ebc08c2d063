"""``examples/stability/run.sh`` end to end on CPU: short HC / mHC / residual trainings from the
same seed, with the training-time diagnostics, then ``tools/stability_report.py`` on their
checkpoints (JSON and PNG). The statistics on hand-built matrices are in
``tests/megatron/test_stability_statistics.py``; the tool's checkpoint lookup and error messages
in ``tests/tools/test_stability_report.py``."""

import json
import math
import re
import subprocess

import matplotlib.image
import pytest

from tests.launching import REPO_ROOT, child_env
from tests.tools.stability_tool import cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# The example script, made short: HC, mHC and the residual baseline from the same seed

LAYERS = 8
ITERS = 20
# A deep-enough model that HC's composite gain grows by two orders of magnitude in 20 steps at a
# high learning rate (measured: about 200x at the last site); mHC's stays at 1 by construction.
SHORT_RUN = {
    "VARIANTS": "hc mhc residual", "LAYERS": str(LAYERS), "SEQ": "32", "MBS": "2",
    "ITERS": str(ITERS), "LR": "1e-2", "WARMUP": "0", "BATCHES": "2", "JOBS": "3",
}  # fmt: skip
VARIANTS = SHORT_RUN["VARIANTS"].split()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Runs the example script on the short settings: one rank per training, one after another,
    then the three checkpoints measured at once.

    Returns:
        ``(out_dir, {label: run JSON}, the script's output)``; out_dir holds each variant's
        folder and ``report/``.
    """
    out = tmp_path_factory.mktemp("stability")
    proc = subprocess.run(
        [str(REPO_ROOT / "examples" / "stability" / "run.sh")],
        env=child_env(OUT_DIR=str(out), **SHORT_RUN), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stats = json.loads((out / "report" / "stability.json").read_text())
    return out, {run["label"]: run for run in stats["runs"]}, proc.stdout


def _composite(run, metric="composite_fwd_gain"):
    return [site[metric] for site in run["sites"].values()]


def test_hc_composite_gain_grows_with_depth_and_exceeds_mhc(report):
    _, runs, stdout = report
    hc, mhc = runs["hc"], runs["mhc"]
    for metric in ("composite_fwd_gain", "composite_bwd_gain"):
        gains = _composite(hc, metric)
        assert gains[-1] > 50 * _composite(mhc, metric)[-1], gains
        # Depth: the last site is far above the first two, and the middle is in between.
        assert gains[-1] > 10 * max(gains[:2]), gains
        assert max(gains[:2]) < gains[len(gains) // 2] < gains[-1], gains
    assert hc["summary"]["composite_fwd_gain_last"] == _composite(hc)[-1]
    assert f"hc: hc, {LAYERS} layers, iteration {ITERS}" in stdout


def test_mhc_composite_gains_stay_near_one(report):
    _, runs, _ = report
    mhc = runs["mhc"]
    for metric in ("composite_fwd_gain", "composite_bwd_gain", "fwd_gain", "bwd_gain"):
        gains = _composite(mhc, metric)
        assert all(0.9 <= g <= 1.7 for g in gains), (metric, gains)
    assert mhc["summary"]["row_error_max"] <= 1e-5 and mhc["summary"]["col_error_max"] <= 1e-3
    assert mhc["note"] is None and mhc["variant"] == "mhc" and mhc["num_streams"] == 4


def test_residual_is_reported_as_identity(report):
    _, runs, stdout = report
    residual = runs["residual"]
    assert residual["note"] and "identity" in residual["note"]
    assert set(_composite(residual)) == {1.0} and residual["num_streams"] == 1
    assert "no mHC sites in this model (variant residual)" in stdout


def test_json_has_every_site_and_metric(report):
    out, runs = report[0] / "report", report[1]
    expected = [
        f"L{layer:03d}.{kind}" for layer in range(1, LAYERS + 1) for kind in ("attention", "mlp")
    ]
    metrics = {
        "fwd_gain", "bwd_gain", "composite_fwd_gain", "composite_bwd_gain", "row_error",
        "col_error", "h_pre_mean", "h_post_mean",
    }  # fmt: skip
    for label in VARIANTS:
        run = json.loads((out / f"{label}.json").read_text())
        assert run == runs[label]
        assert list(run["sites"]) == expected
        assert all(set(site) == metrics for site in run["sites"].values())
        assert run["iteration"] == ITERS and run["num_layers"] == LAYERS
        assert run["batches"] == 2 and run["seq_length"] == 32
        # Below a uniform guess over the 257 byte ids (random weights give about 5.6-6): the
        # trained weights were loaded.
        assert 0 < run["lm_loss"] < math.log(257)


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 600 and height >= 400, (width, height)
    pixels = matplotlib.image.imread(path)  # decodes it all: a truncated file raises
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0.01  # not a blank canvas


def test_pngs_are_valid(report, tmp_path):
    out = report[0] / "report"
    _check_png(out / "stability.png")
    # The plot subcommand from the JSON files alone.
    png = tmp_path / "from-json.png"
    result = cli("plot", out / "hc.json", out / "mhc.json", "--out", png)
    assert result.returncode == 0, result.stderr
    _check_png(png)


def test_each_variant_keeps_its_log_and_reports_its_diagnostics(report):
    """Each variant's log sits in its folder, named by the run's last line; HC and mHC print
    the training-time diagnostics (--mhc-diagnostics-interval) and the report runs last."""
    out, runs, stdout = report
    for variant in VARIANTS:
        log = out / variant / "train.log"
        assert log.read_text().rstrip().splitlines()[-1].endswith(f"; log in {log}")
        assert f"   {variant} trained in " in stdout
    diagnostics = re.findall(
        rf"mHC stability at iteration {ITERS}: composite amax gain at the last site fwd (\S+)",
        stdout,
    )
    # HC's first (order of training), then mHC's; the residual model has no sites.
    assert len(diagnostics) == 2, stdout[-3000:]
    assert float(diagnostics[0]) > 10 and float(diagnostics[1]) == pytest.approx(1.0, abs=1e-3)
    assert stdout.index("training residual") < stdout.index("report in ")
    assert runs["mhc"]["summary"]["composite_fwd_gain_last"] == pytest.approx(1.0, abs=1e-3)
