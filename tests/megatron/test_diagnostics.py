"""The stability diagnostics recorder on a whole model (megatron/diagnostics.py)."""

import pytest
import torch

from tests.megatron.models import MOE, build_model, mhc_config, token_inputs


@pytest.mark.parametrize("recompute", ["none", "stage"])
def test_diagnostics_recorder_records_every_site_once_when_armed(recompute):
    """Sites offer their coefficients to the recorder only while it is armed, one record per
    site up to ``max_records`` (a recompute re-running the coefficients must not add more)."""
    from mhc_megatron.megatron.diagnostics import RECORDER, stability_statistics

    model = build_model(mhc_config(mhc_recompute=recompute, **MOE)).train()
    ids, pos = token_inputs()
    labels = torch.roll(ids, -1, dims=1)
    model(ids, pos, None, labels=labels).sum().backward()
    assert RECORDER.records == {}  # disarmed: nothing kept
    RECORDER.arm(max_records=1)
    try:
        for _ in range(2):  # forward + backward twice: the second finds every site full
            model(ids, pos, None, labels=labels).sum().backward()
    finally:
        RECORDER.disarm()
    records, RECORDER.records = RECORDER.records, {}
    assert sorted(records) == [f"L{i:03d}.{k}" for i in (1, 2, 3) for k in ("attention", "mlp")]
    assert all(len(r) == 1 for r in records.values())
    record = records["L002.mlp"][0]
    assert record.h_res.shape == (2 * 16, 4, 4) and record.h_pre.shape == (2 * 16, 4)
    stats = stability_statistics(records)
    # Paper init at scale 0.01: H_res near J/n, doubly stochastic, so every gain is ~1.
    for values in stats.values():
        assert values["composite_fwd_gain"] == pytest.approx(1.0, abs=1e-4)
        assert values["row_error"] < 1e-5 and values["col_error"] < 1e-3
