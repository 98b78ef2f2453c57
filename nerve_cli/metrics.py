"""Spectral metrics of a covariance eigenspectrum, as defined by NerVE.

All functions take eigenvalues (any order, float64 recommended) and return plain
Python floats in nats. They hold no state and do no I/O. Conventions:

* ``p = lambda / sum(lambda)`` is the normalised spectrum; ``0 ln 0 = 0``.
* Eigenvalues must be finite and non-negative; callers clip rounding noise
  with :func:`clip_eigenvalues` first, which reports how many were clipped.
* A spectrum whose sum is zero (all activations constant) has no defined
  distribution, so every metric raises :class:`DegenerateSpectrumError`.

Reference: Jha & Reagen, "Nonlinear Eigenspectrum Dynamics in LLM Feed-Forward
Networks", ICLR 2026, arXiv 2603.06922.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import rel_entr

__all__ = [
    "DegenerateSpectrumError",
    "SpectrumMetrics",
    "clip_eigenvalues",
    "normalize_spectrum",
    "spectral_entropy",
    "participation_ratio",
    "early_enrichment",
    "js_divergence",
    "compute_spectrum_metrics",
]


class DegenerateSpectrumError(ValueError):
    """Raised when a spectrum has no positive mass, so p = lambda / sum is undefined."""


@dataclass(frozen=True)
class SpectrumMetrics:
    """SE (nats), PR and EEE of one spectrum."""

    se: float
    pr: float
    eee: float


def clip_eigenvalues(eigenvalues: np.ndarray) -> tuple[np.ndarray, int]:
    """Sort eigenvalues descending and clip negative rounding noise to zero.

    Returns the clipped float64 array and the number of entries that were negative.
    Raises ValueError for non-finite input, because NaN or Inf means the
    activations themselves were broken and no metric is meaningful.
    """
    values = np.asarray(eigenvalues, dtype=np.float64).ravel()
    if not np.all(np.isfinite(values)):
        raise ValueError("eigenvalues contain NaN or Inf")

    n_negative = int(np.count_nonzero(values < 0))
    values = np.sort(np.clip(values, 0.0, None))[::-1]
    return values, n_negative


def normalize_spectrum(eigenvalues: np.ndarray) -> np.ndarray:
    """Return ``p = lambda / sum(lambda)`` as float64.

    Raises ValueError for negative or non-finite entries and
    DegenerateSpectrumError when the sum is zero.
    """
    values = np.asarray(eigenvalues, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("spectrum is empty")
    if not np.all(np.isfinite(values)):
        raise ValueError("spectrum contains NaN or Inf")
    if np.any(values < 0):
        raise ValueError("spectrum has negative entries; clip eigenvalues first")

    total = values.sum()
    if total <= 0:
        raise DegenerateSpectrumError("spectrum sums to zero: the activations have no variance")
    return values / total


def spectral_entropy(eigenvalues: np.ndarray) -> float:
    """Spectral entropy ``SE = -sum p_i ln p_i`` in nats, in ``[0, ln D]``."""
    p = normalize_spectrum(eigenvalues)
    positive = p[p > 0]
    return float(-np.sum(positive * np.log(positive)))


def participation_ratio(eigenvalues: np.ndarray) -> float:
    """Participation ratio ``PR = (sum lambda)^2 / sum lambda^2``, in ``[1, D]``.

    Computed on ``p`` (scale invariant) so that very large or very small
    eigenvalues neither overflow nor underflow when squared.
    """
    p = normalize_spectrum(eigenvalues)
    return float(1.0 / np.sum(p * p))


def early_enrichment(eigenvalues: np.ndarray) -> float:
    """Eigenvalue early enrichment, in ``[0, 1)``.

    With eigenvalues sorted descending and ``c_k = p_1 + ... + p_k``:
    ``EEE = sum_{k=1..D} (c_k - k/D) / (D/2)``, clipped to ``[0, 1]``. It is 0
    for a flat spectrum and approaches 1 when one direction carries all variance.
    """
    p = np.sort(normalize_spectrum(eigenvalues))[::-1]
    d = p.size
    cumulative = np.cumsum(p)
    uniform = np.arange(1, d + 1, dtype=np.float64) / d
    value = float(np.sum(cumulative - uniform) / (d / 2.0))
    return min(max(value, 0.0), 1.0)


def js_divergence(eigenvalues_pre: np.ndarray, eigenvalues_post: np.ndarray) -> float:
    """Jensen-Shannon divergence between two normalised spectra, in nats, in ``[0, ln 2]``.

    ``JS = 0.5 KL(p || m) + 0.5 KL(q || m)`` with ``m = (p + q) / 2``. Both
    spectra are sorted descending first, so entry ``i`` of each is its
    ``i``-th largest eigenvalue. Spectra of different lengths raise ValueError:
    padding one with zeros would invent directions that were never measured.
    """
    p = np.sort(normalize_spectrum(eigenvalues_pre))[::-1]
    q = np.sort(normalize_spectrum(eigenvalues_post))[::-1]
    if p.shape != q.shape:
        raise ValueError(
            f"JS needs spectra of equal length, got {p.size} (pre) and {q.size} (post)"
        )

    m = 0.5 * (p + q)
    # rel_entr gives x ln(x/y) with 0 ln 0 = 0, so zero entries need no special case.
    value = 0.5 * np.sum(rel_entr(p, m)) + 0.5 * np.sum(rel_entr(q, m))
    # Rounding can leave -1e-17 for identical inputs, and the bound is exact.
    return float(min(max(value, 0.0), math.log(2.0)))


def compute_spectrum_metrics(eigenvalues: np.ndarray) -> SpectrumMetrics:
    """Compute SE, PR and EEE of one spectrum."""
    return SpectrumMetrics(
        se=spectral_entropy(eigenvalues),
        pr=participation_ratio(eigenvalues),
        eee=early_enrichment(eigenvalues),
    )
