"""Spectral metrics against closed-form spectra.

Tolerances: results are float64 sums over at most a few thousand terms, so
closed forms must match to 1e-12 relative unless a test states otherwise.
"""

import math

import numpy as np
import pytest

from nerve_cli import metrics

RTOL = 1e-12


@pytest.mark.parametrize("d", [1, 2, 7, 512, 3072])
def test_uniform_spectrum_is_maximal(d):
    eigenvalues = np.full(d, 3.5)

    assert metrics.spectral_entropy(eigenvalues) == pytest.approx(math.log(d), rel=RTOL, abs=1e-15)
    assert metrics.participation_ratio(eigenvalues) == pytest.approx(d, rel=RTOL)
    assert metrics.early_enrichment(eigenvalues) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("d", [2, 16, 3072])
def test_one_hot_spectrum_is_minimal(d):
    eigenvalues = np.zeros(d)
    eigenvalues[0] = 2.0

    assert metrics.spectral_entropy(eigenvalues) == 0.0
    assert metrics.participation_ratio(eigenvalues) == pytest.approx(1.0, rel=RTOL)
    # c_k = 1 for every k, so EEE = sum_k (1 - k/D) / (D/2) = (D - 1) / D.
    assert metrics.early_enrichment(eigenvalues) == pytest.approx((d - 1) / d, rel=RTOL)


def test_uniform_over_four_of_3072_directions():
    eigenvalues = np.zeros(3072)
    eigenvalues[:4] = 1e-3

    assert metrics.spectral_entropy(eigenvalues) == pytest.approx(math.log(4), rel=RTOL)
    assert metrics.participation_ratio(eigenvalues) == pytest.approx(4.0, rel=RTOL)


def test_two_level_spectrum():
    # k eigenvalues a and D - k eigenvalues b, with a > b.
    d, k, a, b = 100, 10, 9.0, 1.0
    eigenvalues = np.array([a] * k + [b] * (d - k))
    total = k * a + (d - k) * b
    pa, pb = a / total, b / total

    expected_se = -(k * pa * math.log(pa) + (d - k) * pb * math.log(pb))
    expected_pr = total**2 / (k * a**2 + (d - k) * b**2)
    # c_j = j pa for j <= k, then k pa + (j - k) pb.
    cumulative = [j * pa if j <= k else k * pa + (j - k) * pb for j in range(1, d + 1)]
    expected_eee = sum(c - j / d for j, c in enumerate(cumulative, start=1)) / (d / 2)

    assert metrics.spectral_entropy(eigenvalues) == pytest.approx(expected_se, rel=RTOL)
    assert metrics.participation_ratio(eigenvalues) == pytest.approx(expected_pr, rel=RTOL)
    assert metrics.early_enrichment(eigenvalues) == pytest.approx(expected_eee, rel=RTOL)


def test_order_of_eigenvalues_does_not_matter():
    rng = np.random.default_rng(0)
    eigenvalues = rng.gamma(1.0, size=64)
    shuffled = rng.permutation(eigenvalues)

    assert metrics.early_enrichment(shuffled) == pytest.approx(
        metrics.early_enrichment(eigenvalues), rel=RTOL
    )
    assert metrics.js_divergence(shuffled, eigenvalues) == 0.0


def test_js_closed_form_two_point():
    # p = (1, 0), q = (1/2, 1/2): m = (3/4, 1/4).
    expected = 0.5 * math.log(1 / 0.75) + 0.5 * (
        0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    )

    assert metrics.js_divergence(np.array([1.0, 0.0]), np.array([1.0, 1.0])) == pytest.approx(
        expected, rel=RTOL
    )


def test_js_of_spectrum_with_itself_is_exactly_zero():
    rng = np.random.default_rng(2)
    eigenvalues = rng.gamma(0.5, size=300)

    assert metrics.js_divergence(eigenvalues, eigenvalues) == 0.0
    assert metrics.js_divergence(eigenvalues, 7.0 * eigenvalues) == pytest.approx(0.0, abs=1e-15)


def test_js_of_unequal_lengths_raises():
    with pytest.raises(ValueError, match="equal length"):
        metrics.js_divergence(np.ones(4), np.ones(5))


def test_js_with_subnormal_entries_is_finite():
    pre = np.array([1.0, 5e-324, 0.0])
    post = np.array([1.0, 1.0, 5e-324])

    value = metrics.js_divergence(pre, post)

    assert math.isfinite(value)
    assert 0.0 < value <= math.log(2)


def test_zero_spectrum_raises_degenerate():
    with pytest.raises(metrics.DegenerateSpectrumError):
        metrics.spectral_entropy(np.zeros(8))


def test_clip_eigenvalues_counts_negative_noise():
    values, n_negative = metrics.clip_eigenvalues(np.array([-1e-17, 2.0, 0.0, -3e-18, 1.0]))

    assert n_negative == 2
    assert values.tolist() == [2.0, 1.0, 0.0, 0.0, 0.0]


def test_clip_eigenvalues_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        metrics.clip_eigenvalues(np.array([1.0, np.nan]))


def test_metrics_of_sample_covariance_match_numpy_eigvalsh():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 20)) @ rng.standard_normal((20, 20))
    eigenvalues = np.linalg.eigvalsh(np.cov(x, rowvar=False))
    p = eigenvalues / eigenvalues.sum()

    assert metrics.spectral_entropy(eigenvalues) == pytest.approx(-(p * np.log(p)).sum(), rel=1e-12)
    assert metrics.participation_ratio(eigenvalues) == pytest.approx(1 / (p**2).sum(), rel=1e-12)
