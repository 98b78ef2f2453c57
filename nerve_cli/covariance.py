"""Streaming covariance of activations and its eigenvalues.

Memory is ``O(D^2)`` per accumulator, independent of the number of tokens.
Each batch is centred on its own mean in float64 and merged with the running
moments by the parallel formula of Chan, Golub and LeVeque (1979), so a large
activation mean relative to its spread does not cancel catastrophically, as a
plain sum of outer products would.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)


class StreamingCovariance:
    """Running count, mean and centred sum of outer products of ``D``-dimensional rows.

    ``product_dtype`` sets the precision of the per-batch ``X^T X`` product:
    float64 (the default) is exact to rounding; float32 is faster and is merged
    into float64 moments, with relative error about ``1e-7 * sqrt(batch rows)``.
    The mean and centring are always float64.
    """

    def __init__(
        self,
        dim: int,
        device: torch.device | str = "cpu",
        product_dtype: torch.dtype = torch.float64,
    ) -> None:
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.device = torch.device(device)
        self.product_dtype = product_dtype
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=self.device)
        self.m2 = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)
        self.finite = True

    def update(self, rows: torch.Tensor) -> None:
        """Add a batch of rows, shape ``[n, D]`` in any floating dtype.

        The batch is reduced at once, so the caller may reuse or modify
        ``rows`` afterwards. Non-finite values mark the accumulator as broken
        (see :attr:`finite`) and are not merged.
        """
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"expected rows of shape [n, {self.dim}], got {tuple(rows.shape)}")
        n_batch = rows.shape[0]
        if n_batch == 0:
            return

        # Centre the batch in float64: the mean can be large against the spread.
        batch = rows.to(device=self.device, dtype=torch.float64)  # [n, D]
        batch_mean = batch.mean(dim=0)  # [D]
        if not bool(torch.isfinite(batch_mean).all()):
            self.finite = False
            return
        centred = (batch - batch_mean).to(self.product_dtype)  # [n, D]
        batch_m2 = (centred.T @ centred).to(torch.float64)  # [D, D]

        # Merge the batch moments into the running moments (Chan et al.).
        total = self.count + n_batch
        delta = batch_mean - self.mean  # [D]
        self.mean += delta * (n_batch / total)
        self.m2 += batch_m2
        self.m2 += torch.outer(delta, delta) * (self.count * n_batch / total)
        self.count = total

    def covariance(self) -> torch.Tensor:
        """Return the unbiased covariance ``M2 / (N - 1)`` as float64 ``[D, D]``.

        Raises ValueError with fewer than two rows, since the unbiased
        estimate is undefined there.
        """
        if self.count < 2:
            raise ValueError(f"covariance needs at least 2 tokens, got {self.count}")
        return self.m2 / (self.count - 1)


def compute_eigenvalues(covariances: list[torch.Tensor]) -> list[np.ndarray]:
    """Return the eigenvalues of symmetric matrices, float64, sorted descending.

    Matrices of equal size are solved in one batched ``eigvalsh`` call on their
    device. A solve that fails there (e.g. a device solver that does not
    converge) is retried on the CPU in float64. Negative rounding noise is
    kept; callers clip it (see ``metrics.clip_eigenvalues``).
    """
    results: list[np.ndarray | None] = [None] * len(covariances)
    by_size: dict[tuple[int, torch.device], list[int]] = {}
    for index, matrix in enumerate(covariances):
        by_size.setdefault((matrix.shape[0], matrix.device), []).append(index)

    for indices in by_size.values():
        stacked = torch.stack([covariances[i].to(torch.float64) for i in indices])  # [k, D, D]
        values = _solve_symmetric(stacked)  # [k, D], ascending
        for row, index in zip(values, indices, strict=True):
            results[index] = row.flip(0).cpu().numpy()
    return results  # type: ignore[return-value]


def _solve_symmetric(stacked: torch.Tensor) -> torch.Tensor:
    """Solve a batch of symmetric eigenvalue problems, falling back to the CPU."""
    try:
        return torch.linalg.eigvalsh(stacked)
    except (RuntimeError, torch.linalg.LinAlgError) as error:
        if stacked.device.type == "cpu":
            raise
        logger.warning(
            "eigenvalue solve failed on %s (%s); retrying on the CPU in float64",
            stacked.device,
            error,
        )
        return torch.linalg.eigvalsh(stacked.to("cpu", torch.float64))
