"""``tools/stability_report.py`` end to end on CPU: short HC / mHC / residual trainings from the
same seed, then the report on their checkpoints (JSON and PNG), and ``examples/stability/run.sh``.
The statistics on hand-built matrices are in ``tests/megatron/test_stability_statistics.py``; the
tool's checkpoint lookup and error messages in ``tests/tools/test_stability_report.py``."""

import json
import math
import subprocess
from concurrent.futures import ThreadPoolExecutor

import matplotlib.image
import pytest

from tests.launching import CPU_LOCAL_FLAGS, REPO_ROOT, child_env, launch
from tests.tools.stability_tool import cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# Train HC, mHC and the residual baseline briefly from the same seed, then report

LAYERS = 8
# A deep-enough model that HC's composite gain grows by two orders of magnitude in 20 steps at a
# high learning rate on mock data (measured: about 650x); mHC's stays at 1 by construction.
SHORT_RUN = [
    *CPU_LOCAL_FLAGS,
    "--num-layers", str(LAYERS), "--hidden-size", "64", "--num-attention-heads", "4",
    "--ffn-hidden-size", "128", "--seq-length", "32", "--max-position-embeddings", "32",
    "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
    "--attention-dropout", "0", "--hidden-dropout", "0", "--mhc-num-streams", "4",
    "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "20",
    "--lr", "1e-2", "--lr-decay-style", "constant", "--clip-grad", "1.0", "--adam-beta2", "0.95",
    "--weight-decay", "0.1", "--init-method-std", "0.02", "--untie-embeddings-and-output-weights",
    "--log-interval", "10", "--eval-iters", "0", "--eval-interval", "1000",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "257", "--seed", "1234",
    "--ckpt-format", "torch_dist", "--save-interval", "20",
]  # fmt: skip
VARIANTS = ("hc", "mhc", "residual")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Trains the three variants concurrently (one rank each), then runs ``report`` on them.

    Returns:
        ``(out_dir, {label: run JSON}, report stdout)``.
    """
    work = tmp_path_factory.mktemp("stability")

    def train(variant):
        ckpt = work / variant
        args = [*SHORT_RUN, "--mhc-variant", variant, "--save", str(ckpt)]
        rc, text = launch(REPO_ROOT / "pretrain_mhc.py", 1, args, work / f"{variant}.log")
        assert rc == 0, f"training {variant} failed ({rc}):\n{text[-4000:]}"
        return f"{variant}={ckpt}"

    with ThreadPoolExecutor(len(VARIANTS)) as pool:
        runs = list(pool.map(train, VARIANTS))
    out = work / "report"
    cmd = ["report", *(a for run in runs for a in ("--run", run)), "--out-dir", out]
    # Three measure processes, ~10 s each alone; a loaded machine can take several times that.
    result = cli(*cmd, "--batches", "2", "--micro-batch-size", "2", "--jobs", "3", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    stats = json.loads((out / "stability.json").read_text())
    return out, {run["label"]: run for run in stats["runs"]}, result.stdout


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
    assert "hc: hc, 8 layers, iteration 20" in stdout


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
    out, runs, _ = report
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
        assert run["iteration"] == 20 and run["num_layers"] == LAYERS
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
    out, _, _ = report
    _check_png(out / "stability.png")
    # The plot subcommand from the JSON files alone.
    png = tmp_path / "from-json.png"
    result = cli("plot", out / "hc.json", out / "mhc.json", "--out", png)
    assert result.returncode == 0, result.stderr
    _check_png(png)


def test_the_example_script_runs_and_reports(tmp_path):
    """examples/stability/run.sh on a 2-layer mHC model, 3 steps: each variant's log in its
    folder, named by the run's last line, and the report's JSON and PNG written."""
    out = tmp_path / "stability"
    env = child_env(
        LAYERS="2", ITERS="3", WARMUP="1", VARIANTS="mhc", BATCHES="1", OUT_DIR=str(out)
    )
    proc = subprocess.run(
        [str(REPO_ROOT / "examples" / "stability" / "run.sh")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = out / "mhc" / "train.log"
    assert log.read_text().rstrip().splitlines()[-1].endswith(f"; log in {log}")
    report = json.loads((out / "report" / "stability.json").read_text())
    (run,) = report["runs"]
    assert run["variant"] == "mhc" and run["iteration"] == 3
    assert run["summary"]["composite_fwd_gain_last"] == pytest.approx(1.0, abs=1e-3)
    assert (out / "report" / "stability.png").read_bytes().startswith(PNG_SIGNATURE)
