"""The stability statistics of ``mhc_megatron/megatron/diagnostics.py`` on hand-built mixing
matrices: ``amax_gains``, ``stability_statistics`` (single-site and composite gains, row and
column errors, gate means) and ``summarize``. Pure tensor math, no model."""

import pytest
import torch

from mhc_megatron import ops
from mhc_megatron.megatron.diagnostics import (
    SiteRecord,
    amax_gains,
    stability_statistics,
    summarize,
)


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
