"""Property-based tests of the spectral metrics and the streaming covariance.

The metrics must stay within their stated ranges, ignore the scale and the
order of the eigenvalues, and give a JS divergence of exactly 0 between a
spectrum and itself. The streaming covariance must give the same matrix for
any split of the same rows into batches.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nerve_cli import metrics
from nerve_cli.covariance import StreamingCovariance

# Non-negative spectra with positive mass; tiny normal values and exact zeros included.
spectra = (
    st.integers(min_value=1, max_value=40)
    .flatmap(
        lambda size: arrays(
            np.float64,
            size,
            elements=st.one_of(
                st.just(0.0),
                st.floats(min_value=1e-12, max_value=1e6, allow_subnormal=False),
            ),
        )
    )
    .filter(lambda values: values.sum() > 0)
)

spectrum_pairs = (
    st.integers(min_value=1, max_value=40)
    .flatmap(
        lambda size: st.tuples(
            arrays(
                np.float64,
                size,
                elements=st.floats(min_value=0.0, max_value=1e6, allow_subnormal=False),
            ),
            arrays(
                np.float64,
                size,
                elements=st.floats(min_value=0.0, max_value=1e6, allow_subnormal=False),
            ),
        )
    )
    .filter(lambda pair: pair[0].sum() > 0 and pair[1].sum() > 0)
)


def all_metrics(values: np.ndarray) -> tuple[float, float, float]:
    return (
        metrics.spectral_entropy(values),
        metrics.participation_ratio(values),
        metrics.early_enrichment(values),
    )


@given(spectra)
def test_metrics_within_bounds(values):
    dimension = values.size
    se, pr, eee = all_metrics(values)

    assert 0.0 <= se <= math.log(dimension) + 1e-12
    assert 1.0 - 1e-12 <= pr <= dimension * (1 + 1e-12)
    assert 0.0 <= eee <= 1.0


@given(spectrum_pairs)
def test_js_within_bounds_and_symmetric(pair):
    pre, post = pair

    value = metrics.js_divergence(pre, post)

    assert 0.0 <= value <= math.log(2.0)
    assert math.isclose(value, metrics.js_divergence(post, pre), rel_tol=1e-12, abs_tol=1e-15)


@given(spectra)
def test_js_self_is_zero(values):
    assert metrics.js_divergence(values, values) == 0.0


@given(spectra, st.floats(min_value=1e-6, max_value=1e6))
def test_metrics_scale_invariant(values, scale):
    for original, scaled in zip(all_metrics(values), all_metrics(values * scale), strict=True):
        assert math.isclose(original, scaled, rel_tol=1e-9, abs_tol=1e-12)


@given(spectrum_pairs, st.randoms(use_true_random=False))
def test_metrics_permutation_invariant(pair, random):
    pre, post = pair
    order_pre = list(range(pre.size))
    order_post = list(range(post.size))
    random.shuffle(order_pre)
    random.shuffle(order_post)
    shuffled_pre, shuffled_post = pre[order_pre], post[order_post]

    for original, shuffled in zip(all_metrics(pre), all_metrics(shuffled_pre), strict=True):
        assert math.isclose(original, shuffled, rel_tol=1e-12, abs_tol=1e-12)
    assert math.isclose(
        metrics.js_divergence(pre, post),
        metrics.js_divergence(shuffled_pre, shuffled_post),
        rel_tol=1e-12,
        abs_tol=1e-15,
    )


def accumulate(batches: list[np.ndarray], dimension: int) -> np.ndarray:
    accumulator = StreamingCovariance(dimension)
    for batch in batches:
        accumulator.update(torch.from_numpy(batch))
    return accumulator.covariance().numpy()


def assert_close_covariance(actual: np.ndarray, expected: np.ndarray, rows: np.ndarray) -> None:
    """Compare two covariances to 1e-10 relative, in the Frobenius norm.

    The absolute floor ``1e-20 * max|x|^2`` only matters for near-constant
    data, whose covariance float64 cannot resolve below that level.
    """
    scale = float(np.max(np.abs(rows))) ** 2
    error = np.linalg.norm(actual - expected)
    assert error <= 1e-10 * np.linalg.norm(expected) + 1e-20 * scale, (
        error,
        np.linalg.norm(expected),
    )


@settings(max_examples=150)
@given(st.data())
def test_covariance_split_invariant(data):
    n_rows = data.draw(st.integers(min_value=2, max_value=60), label="n_rows")
    dimension = data.draw(st.integers(min_value=1, max_value=6), label="dimension")
    rows = data.draw(
        arrays(
            np.float64,
            (n_rows, dimension),
            elements=st.floats(min_value=-1e3, max_value=1e3, allow_subnormal=False),
        ),
        label="rows",
    )
    cuts = sorted(
        data.draw(st.lists(st.integers(min_value=0, max_value=n_rows), max_size=8), label="cuts")
    )
    batches = np.split(rows, cuts)  # empty batches included, as a short last batch can be

    split = accumulate(batches, dimension)
    whole = accumulate([rows], dimension)
    reference = np.cov(rows, rowvar=False).reshape(dimension, dimension)

    assert_close_covariance(split, whole, rows)
    assert_close_covariance(split, reference, rows)
