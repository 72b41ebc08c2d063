"""The sweep's power-law fit on known points, and the gaps of the variants to the baseline."""

import math

import numpy as np
import pytest

from mhc_megatron.sweep.fit import fit_power_law, fit_variants, gaps_to_baseline
from tests.tools.sweep_helpers import result_rows


def test_fit_recovers_an_exact_power_law():
    compute = np.geomspace(1e15, 1e21, 7)
    a, b = 25.0, 0.07
    fa, fb, r2 = fit_power_law(compute, a * compute**-b)
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
    fa, fb, r2 = fit_power_law(compute, loss)
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
    rows = result_rows(points)
    fits, notes = fit_variants(rows)
    by_variant = {f["variant"]: f for f in fits}
    assert set(by_variant) == {"residual", "mhc"}
    # fit_variants writes 6 significant digits.
    assert float(by_variant["residual"]["b"]) == pytest.approx(b, rel=1e-5)
    assert float(by_variant["residual"]["a"]) == pytest.approx(a, rel=1e-5)
    assert float(by_variant["mhc"]["a"]) == pytest.approx(0.98 * a, rel=1e-5)
    assert by_variant["mhc"]["points"] == 3
    assert any("hc: left out" in n and "s2-d-hc" in n and "s3-d-hc" in n for n in notes)
    assert any(n.startswith("hc: not fitted") and "needs at least 2" in n for n in notes)

    gaps = gaps_to_baseline(rows, fits, "residual")
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
    assert gaps_to_baseline(rows, fits, None) == []
