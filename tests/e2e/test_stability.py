"""Stability diagnostics: ``stability_statistics`` on hand-built matrices, and
``tools/stability_report.py`` end to end on CPU (short HC / mHC / residual trainings from the
same seed, then the report), plus its error paths."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import matplotlib.image
import pytest
import torch

from mhc_megatron import ops
from mhc_megatron.megatron.diagnostics import (
    SiteRecord,
    amax_gains,
    stability_statistics,
    summarize,
)
from tests.launching import CPU_LOCAL_FLAGS, REPO_ROOT, child_env, launch

TOOL = REPO_ROOT / "tools" / "stability_report.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _load_tool():
    spec = importlib.util.spec_from_file_location("stability_report", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report_tool = _load_tool()


# --------------------------------------------------------------------------------------------
# stability_statistics on hand-built matrices


def _records(*h_res_per_site, h_pre=None, h_post=None):
    """``{L001.attention: [SiteRecord], L001.mlp: [...], L002.attention: ...}``, one record per
    site, in model order; each ``h_res`` is ``[T, n, n]`` (or ``[n, n]``: one token)."""
    kinds = ("attention", "mlp")
    records = {}
    for index, h in enumerate(h_res_per_site):
        h = torch.as_tensor(h, dtype=torch.float32)
        h = h if h.dim() == 3 else h[None]
        t, n = h.shape[0], h.shape[-1]
        pre = torch.full((t, n), 0.5) if h_pre is None else h_pre
        post = torch.ones(t, n) if h_post is None else h_post
        key = f"L{index // 2 + 1:03d}.{kinds[index % 2]}"
        records[key] = [SiteRecord(pre, post, h)]
    return records


def test_permutations_have_gain_one_everywhere():
    perms = ops.permutation_matrices(4)  # [24, 4, 4], the identity first
    # Six sites, each with 24 tokens of different permutations: products stay permutations.
    sites = [perms.roll(shift, dims=0) for shift in range(6)]
    stats = stability_statistics(_records(*sites))
    assert list(stats) == [f"L00{i}.{k}" for i in (1, 2, 3) for k in ("attention", "mlp")]
    for values in stats.values():
        for name in ("fwd_gain", "bwd_gain", "composite_fwd_gain", "composite_bwd_gain"):
            assert values[name] == pytest.approx(1.0, abs=1e-12)
        assert values["row_error"] == pytest.approx(0.0, abs=1e-7)
        assert values["col_error"] == pytest.approx(0.0, abs=1e-7)


def test_scaled_identity_composite_gain_is_the_power():
    c, n, k = 1.5, 4, 6
    stats = stability_statistics(_records(*[c * torch.eye(n)] * k))
    for i, values in enumerate(stats.values(), start=1):
        assert values["fwd_gain"] == pytest.approx(c) and values["bwd_gain"] == pytest.approx(c)
        assert values["composite_fwd_gain"] == pytest.approx(c**i, rel=1e-6)
        assert values["composite_bwd_gain"] == pytest.approx(c**i, rel=1e-6)
        assert values["row_error"] == pytest.approx(c - 1) == values["col_error"]
    assert summarize(stats)["composite_fwd_gain_last"] == pytest.approx(c**k, rel=1e-6)


def test_forward_and_backward_gains_differ_for_a_non_symmetric_matrix():
    # Sums of |h|: rows 2 and 0 (forward gain 2), columns 1 and 1 (backward gain 1); the -1
    # counts as 1 in the gains.
    h = torch.tensor([[1.0, -1.0], [0.0, 0.0]])
    values = stability_statistics(_records(h))["L001.attention"]
    assert values["fwd_gain"] == pytest.approx(2.0)
    assert values["bwd_gain"] == pytest.approx(1.0)
    # The errors use the signed sums: rows 0 and 0 (error 1), columns 1 and -1 (error 2).
    assert values["row_error"] == pytest.approx(1.0)
    assert values["col_error"] == pytest.approx(2.0)


def test_composite_product_runs_in_model_order():
    # Site 1 then site 2: the composite is h2 @ h1 = 0, while h1 @ h2 would have gain 3.
    h1 = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    h2 = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    assert [g.item() for g in amax_gains(h1 @ h2)] == [3.0, 3.0]  # the other order
    stats = stability_statistics(_records(h1, h2))
    assert stats["L001.mlp"]["composite_fwd_gain"] == pytest.approx(0.0)
    assert stats["L001.mlp"]["composite_bwd_gain"] == pytest.approx(0.0)
    assert stats["L001.attention"]["composite_fwd_gain"] == pytest.approx(2.0)


def test_gains_are_means_over_tokens_and_records_and_errors_are_maxima():
    two_tokens = torch.stack([2 * torch.eye(3), 4 * torch.eye(3)])  # gains 2 and 4 -> mean 3
    records = _records(two_tokens)
    records["L001.attention"].append(
        SiteRecord(torch.zeros(2, 3), torch.ones(2, 3), 5 * two_tokens)
    )
    values = stability_statistics(records)["L001.attention"]
    assert values["fwd_gain"] == pytest.approx((3 + 15) / 2)  # records 1 and 2 averaged
    assert values["row_error"] == pytest.approx(19.0)  # 5 * 4 - 1, the worst token and record
    assert values["h_pre_mean"] == pytest.approx(0.25)  # 0.5 then 0.0
    assert values["h_post_mean"] == pytest.approx(1.0)


def test_sinkhorn_errors_within_the_spec_and_a_known_row_error():
    gen = torch.Generator().manual_seed(0)
    h = ops.sinkhorn(0.5 * torch.randn(64, 4, 4, generator=gen), iters=20, eps=1e-6)
    values = stability_statistics(_records(h, h, h, h))
    for site in values.values():
        assert site["row_error"] <= 1e-5  # rows end the iteration (spec section 5)
        assert site["col_error"] <= 1e-3
        assert 0.999 <= site["composite_fwd_gain"] <= 1.001
    # Not doubly stochastic: row sums 1 and 0.8 (error 0.2), column sums 0.7 and 1.1 (0.3).
    skewed = torch.tensor([[0.5, 0.5], [0.2, 0.6]])
    site = stability_statistics(_records(skewed))["L001.attention"]
    assert site["row_error"] == pytest.approx(0.2, abs=1e-6)
    assert site["col_error"] == pytest.approx(0.3, abs=1e-6)


def test_identity_statistics_cover_every_site():
    stats = report_tool.identity_statistics(3)
    assert list(stats) == [f"L00{i}.{k}" for i in (1, 2, 3) for k in ("attention", "mlp")]
    assert {v["composite_fwd_gain"] for v in stats.values()} == {1.0}
    assert summarize(stats)["composite_bwd_gain_max"] == 1.0


# --------------------------------------------------------------------------------------------
# The tool's input checks (no Megatron)


def test_resolve_checkpoint_finds_the_iteration(tmp_path):
    save = tmp_path / "ckpt"
    for it in (5, 10):
        (save / f"iter_{it:07d}").mkdir(parents=True)
        (save / f"iter_{it:07d}" / "metadata.json").write_text("{}")
    assert report_tool.resolve_checkpoint(save) == (save, 10, save / "iter_0000010")
    (save / "latest_checkpointed_iteration.txt").write_text("5\n")
    assert report_tool.resolve_checkpoint(save) == (save, None, save / "iter_0000005")
    assert report_tool.resolve_checkpoint(save / "iter_0000010") == (
        save, 10, save / "iter_0000010",
    )  # fmt: skip
    (save / "latest_checkpointed_iteration.txt").write_text("7\n")  # no iter_0000007
    with pytest.raises(report_tool.ReportError, match="iter_0000007 holds no torch_dist"):
        report_tool.resolve_checkpoint(save)


def _cli(*args, timeout=120):
    # One thread per process: the report's measure processes run side by side on few cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_missing_and_empty_checkpoint_dirs_are_clear_errors(tmp_path):
    missing = tmp_path / "no-such-run"
    result = _cli("measure", missing, "--out", tmp_path / "x.json", "--mock-data")
    assert result.returncode != 0
    assert f"checkpoint directory {missing} does not exist" in result.stderr
    assert "--save directory of pretrain_mhc.py" in result.stderr
    assert "Traceback" not in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _cli("report", "--run", f"a={empty}", "--out-dir", tmp_path / "out")
    assert result.returncode != 0
    assert f"no checkpoint in {empty}: it is empty" in result.stderr
    assert not (tmp_path / "out").exists()  # refused before measuring anything


def test_unreadable_json_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = _cli("plot", bad, "--out", tmp_path / "x.png")
    assert result.returncode != 0
    assert f"cannot read {bad}" in result.stderr and "Traceback" not in result.stderr
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"loss": 1.0}))
    result = _cli("plot", other, "--out", tmp_path / "x.png")
    assert result.returncode != 0 and "is not a stability measurement" in result.stderr
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------------------------
# End to end: train HC, mHC and the residual baseline briefly from the same seed, then report

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
    result = _cli(*cmd, "--batches", "2", "--micro-batch-size", "2", "--jobs", "3", timeout=600)
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
    result = _cli("plot", out / "hc.json", out / "mhc.json", "--out", png)
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
