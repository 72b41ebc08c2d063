"""``tools/stability_report.py`` without a checkpoint to measure: the identity statistics it
reports for a model without mHC sites, how it finds the checkpoint in a ``--save`` directory,
and its error messages for missing or empty checkpoint directories and unreadable JSON (each
refused before Megatron is imported). The end-to-end report on trained checkpoints is in
``tests/e2e/test_stability.py``."""

import json

import pytest

from mhc_megatron.megatron.diagnostics import summarize
from tests.tools.stability_tool import cli, report_tool


def test_identity_statistics_cover_every_site():
    stats = report_tool.identity_statistics(3)
    assert list(stats) == [f"L00{i}.{k}" for i in (1, 2, 3) for k in ("attention", "mlp")]
    assert {v["composite_fwd_gain"] for v in stats.values()} == {1.0}
    assert summarize(stats)["composite_bwd_gain_max"] == 1.0


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


def test_missing_and_empty_checkpoint_dirs_are_clear_errors(tmp_path):
    missing = tmp_path / "no-such-run"
    result = cli("measure", missing, "--out", tmp_path / "x.json", "--mock-data")
    assert result.returncode != 0
    assert f"checkpoint directory {missing} does not exist" in result.stderr
    assert "--save directory of pretrain_mhc.py" in result.stderr
    assert "Traceback" not in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("report", "--run", f"a={empty}", "--out-dir", tmp_path / "out")
    assert result.returncode != 0
    assert f"no checkpoint in {empty}: it is empty" in result.stderr
    assert not (tmp_path / "out").exists()  # refused before measuring anything


def test_unreadable_json_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = cli("plot", bad, "--out", tmp_path / "x.png")
    assert result.returncode != 0
    assert f"cannot read {bad}" in result.stderr and "Traceback" not in result.stderr
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"loss": 1.0}))
    result = cli("plot", other, "--out", tmp_path / "x.png")
    assert result.returncode != 0 and "is not a stability measurement" in result.stderr
    assert not (tmp_path / "x.png").exists()
