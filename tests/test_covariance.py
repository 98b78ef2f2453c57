"""StreamingCovariance against numpy.cov, and the batched eigenvalue solve.

Tolerances, relative to the largest covariance entry:

* float64 products: 1e-9. The data below has mean 1e4 and spread 1e-2, so a
  plain sum of outer products would lose every digit; numpy.cov itself
  agrees with a float64 two-pass computation to about 1e-11 here.
* float32 products merged into float64: 1e-5, three times the ``1e-7 *
  sqrt(rows per batch)`` rounding bound for batches of up to 1000 rows. A
  float32 centring of these float64 rows would be off by about 6e-2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nerve_cli.covariance import (
    StreamingCovariance,
    compute_covariance_eigenvalues,
    compute_eigenvalues,
    default_product_dtype,
)

FLOAT64_RTOL = 1e-9
FLOAT32_RTOL = 1e-5


def large_mean_rows(n_rows: int = 1200, dim: int = 48, seed: int = 0) -> np.ndarray:
    """Rows with mean 1e4 and spread 1e-2, correlated across columns, float64."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    return 1e4 + 1e-2 * rng.standard_normal((n_rows, dim)) @ mixing


def random_split(n_rows: int, seed: int) -> list[int]:
    """Sorted cut points of a random split into batches, including batches of one row."""
    rng = np.random.default_rng(seed)
    cuts = rng.choice(np.arange(1, n_rows), size=9, replace=False)
    return sorted({1, 2, *cuts.tolist()})


def accumulate(
    rows: np.ndarray, cuts: list[int], product_dtype: torch.dtype
) -> StreamingCovariance:
    accumulator = StreamingCovariance(rows.shape[1], "cpu", product_dtype)
    for batch in np.split(rows, cuts):
        accumulator.update(torch.from_numpy(batch))
    return accumulator


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float64_products_match_numpy_cov(seed):
    rows = large_mean_rows(seed=seed)

    accumulator = accumulate(rows, random_split(len(rows), seed), torch.float64)

    assert accumulator.count == len(rows)
    assert (
        relative_error(accumulator.covariance().numpy(), np.cov(rows, rowvar=False)) < FLOAT64_RTOL
    )
    np.testing.assert_allclose(accumulator.mean.numpy(), rows.mean(axis=0), rtol=1e-14)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_products_match_numpy_cov(seed):
    rows = large_mean_rows(seed=seed)

    accumulator = accumulate(rows, random_split(len(rows), seed), torch.float32)

    assert (
        relative_error(accumulator.covariance().numpy(), np.cov(rows, rowvar=False)) < FLOAT32_RTOL
    )
    np.testing.assert_allclose(accumulator.mean.numpy(), rows.mean(axis=0), rtol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_rows_are_centred_exactly(dtype):
    # Mean 512 against spread 0.5: the float32 centring of float32 (or half)
    # rows must not lose the spread. The reference uses the same rounded values.
    rng = np.random.default_rng(5)
    rows = torch.from_numpy(512 + 0.5 * rng.standard_normal((3000, 40))).to(dtype)
    expected = np.cov(rows.double().numpy(), rowvar=False)

    accumulator = StreamingCovariance(40, "cpu", torch.float32)
    for batch in torch.split(rows, 700):
        accumulator.update(batch)

    assert relative_error(accumulator.covariance().numpy(), expected) < FLOAT32_RTOL


def test_split_does_not_change_result():
    rows = large_mean_rows()

    whole = accumulate(rows, [], torch.float64).covariance()
    pieces = accumulate(rows, random_split(len(rows), 7), torch.float64).covariance()

    assert relative_error(pieces.numpy(), whole.numpy()) < FLOAT64_RTOL


def test_covariance_is_exactly_symmetric():
    accumulator = accumulate(large_mean_rows(), [300, 301], torch.float32)

    covariance = accumulator.covariance()

    assert torch.equal(covariance, covariance.T)
    assert covariance.dtype == torch.float64


def test_update_leaves_rows_unchanged():
    rows = torch.from_numpy(large_mean_rows()).float()
    original = rows.clone()

    StreamingCovariance(rows.shape[1], "cpu", torch.float32).update(rows)

    assert torch.equal(rows, original)


def test_non_contiguous_rows():
    rows = torch.from_numpy(large_mean_rows(dim=96))
    half = rows[:, 10:58]  # a column slice, as taken from a fused gate-and-up projection

    accumulator = StreamingCovariance(48, "cpu", torch.float64)
    accumulator.update(half)

    assert (
        relative_error(accumulator.covariance().numpy(), np.cov(half.numpy(), rowvar=False))
        < FLOAT64_RTOL
    )


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_batch_is_not_merged(bad_value):
    rows = torch.from_numpy(large_mean_rows())
    accumulator = StreamingCovariance(rows.shape[1], "cpu", torch.float32)
    accumulator.update(rows[:500])
    broken = rows[500:600].clone()
    broken[17, 3] = bad_value

    accumulator.update(broken)

    assert accumulator.finite is False
    assert accumulator.count == 500
    assert torch.isfinite(accumulator.covariance()).all()


def test_float32_product_overflow_marks_not_finite():
    # Finite rows whose squares exceed the float32 range (about 3.4e38).
    rows = torch.tensor([[1e20, 0.0], [-1e20, 1.0], [3e20, 2.0]], dtype=torch.float64)
    accumulator = StreamingCovariance(2, "cpu", torch.float32)

    accumulator.update(rows)

    assert accumulator.finite is False
    assert accumulator.count == 0


def test_empty_batch_is_ignored():
    accumulator = StreamingCovariance(4, "cpu", torch.float32)

    accumulator.update(torch.empty(0, 4))

    assert accumulator.count == 0
    assert accumulator.finite is True


def test_covariance_needs_two_rows():
    accumulator = StreamingCovariance(3)
    accumulator.update(torch.ones(1, 3))

    with pytest.raises(ValueError, match="at least 2 tokens"):
        accumulator.covariance()


@pytest.mark.parametrize("shape", [(5,), (5, 4), (2, 5, 3)])
def test_wrong_shape_raises(shape):
    accumulator = StreamingCovariance(3)

    with pytest.raises(ValueError, match=r"expected rows of shape \[n, 3\]"):
        accumulator.update(torch.ones(shape))


def test_invalid_product_dtype_raises():
    with pytest.raises(ValueError, match="product_dtype"):
        StreamingCovariance(3, "cpu", torch.float16)


def test_default_product_dtype_is_float32():
    assert default_product_dtype("cpu") == torch.float32
    assert default_product_dtype(torch.device("cuda")) == torch.float32


def test_covariance_eigenvalues_match_numpy():
    rng = np.random.default_rng(3)
    accumulators = []
    for dim in (30, 30, 12):
        accumulator = StreamingCovariance(dim, "cpu", torch.float64)
        accumulator.update(
            torch.from_numpy(rng.standard_normal((200, dim)) * np.arange(1, dim + 1))
        )
        accumulators.append(accumulator)
    threads = torch.get_num_threads()

    spectra = compute_covariance_eigenvalues(accumulators)

    assert torch.get_num_threads() == threads
    for accumulator, values in zip(accumulators, spectra, strict=True):
        expected = np.linalg.eigvalsh(accumulator.covariance().numpy())[::-1]
        np.testing.assert_allclose(values, expected, rtol=1e-10, atol=1e-12 * expected[0])
        assert np.all(np.diff(values) <= 0)


def test_compute_eigenvalues_sorts_descending():
    matrices = [torch.diag(torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)), torch.eye(2)]

    spectra = compute_eigenvalues(matrices)

    np.testing.assert_allclose(spectra[0], [3.0, 2.0, 1.0])
    np.testing.assert_allclose(spectra[1], [1.0, 1.0])
