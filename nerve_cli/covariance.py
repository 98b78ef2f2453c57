"""Streaming covariance of activations and its eigenvalues.

Memory is ``O(D^2)`` per accumulator, independent of the number of tokens.
Each batch is centred on its own mean and merged with the running moments by
the parallel formula of Chan, Golub and LeVeque (1979). A plain sum of outer
products would cancel catastrophically when the activation mean is large
relative to its spread; this does not.

On the CPU the per-batch product ``X^T X`` is a BLAS ``syrk`` call (scipy's
BLAS), which computes one triangle and so half the multiply-adds of a full
matrix product. On other devices it is a full ``torch`` matrix product.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from scipy.linalg import blas
from threadpoolctl import ThreadpoolController

logger = logging.getLogger(__name__)

# Estimated float64 copies of each matrix that a batched eigenvalue call holds
# on a GPU: the stacked input, the solver's copy and its workspace.
_SOLVER_COPIES = 4


def default_product_dtype(device: torch.device | str) -> torch.dtype:
    """Return the product precision nerve uses on ``device``: float32 everywhere.

    float32 products of centred batches, merged into float64 moments, agree
    with float64 products to about 1e-7 relative on the metrics and take half
    the time on the CPU (figures in BENCHMARKS.md). GPUs other than data-centre
    models run float64 matrix products at 1/32 to 1/64 of the float32 rate.
    """
    return torch.float32


class StreamingCovariance:
    """Running count, mean and centred sum of outer products of ``D``-dimensional rows.

    ``product_dtype`` sets the precision of the per-batch ``X^T X`` product.
    float64 (the default) is exact to rounding. float32 takes about half the
    time on the CPU and is merged into float64 moments, with relative error
    about ``1e-7 * sqrt(batch rows)`` per batch. Each batch is centred on its
    own mean before the product: in float64 when the rows or the product are
    float64, otherwise in float32, where the difference of two float32 values
    is correctly rounded, so the centred value has relative error at most
    ``2**-24`` whatever the size of the mean. The running mean and moments
    are always float64.
    """

    def __init__(
        self,
        dim: int,
        device: torch.device | str = "cpu",
        product_dtype: torch.dtype = torch.float64,
    ) -> None:
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        if product_dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"product_dtype must be torch.float32 or torch.float64, got {product_dtype}"
            )
        self.dim = dim
        self.device = torch.device(device)
        self.product_dtype = product_dtype
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=self.device)
        # Only the upper triangle is kept up to date; covariance() mirrors it.
        self._m2_upper = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)
        self._finite = True
        # Off the CPU the finiteness check stays on the device, because reading
        # it back would stall the forward pass once per batch.
        self._nonfinite_seen = (
            None
            if self.device.type == "cpu"
            else torch.zeros((), dtype=torch.bool, device=self.device)
        )

    @property
    def finite(self) -> bool:
        """Whether every batch so far was finite (no NaN or Inf, no float32 overflow)."""
        if self._nonfinite_seen is not None and bool(self._nonfinite_seen):
            return False
        return self._finite

    def update(self, rows: torch.Tensor) -> None:
        """Add a batch of rows, shape ``[n, D]`` in any dtype.

        The batch is reduced at once and never modified, so the caller may
        reuse or modify ``rows`` afterwards. On the CPU a batch with NaN or
        Inf values (or whose float32 product overflows) marks the accumulator
        as broken (see :attr:`finite`) and is not merged. On other devices it
        is detected without synchronising, so it is merged and the moments
        become NaN; :attr:`finite` is False either way.
        """
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"expected rows of shape [n, {self.dim}], got {tuple(rows.shape)}")
        n_batch = rows.shape[0]
        if n_batch == 0:
            return

        shift, centred = self._centre(rows.to(self.device))  # [D], [n, D]
        batch_sum = centred.sum(dim=0).to(torch.float64)  # [D], sum of (row - shift)
        product = self._product(centred)  # [D, D], upper triangle valid
        if not self._check_finite(batch_sum, product):
            return
        self._merge(n_batch, shift, batch_sum, product)

    def _centre(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the batch mean used as shift and the rows minus it, in the product dtype."""
        exact = self.product_dtype == torch.float64 or rows.dtype == torch.float64
        centring_dtype = torch.float64 if exact else torch.float32
        if rows.dtype == centring_dtype:
            shift = rows.mean(dim=0)  # [D]
            centred = rows - shift  # [n, D], a new tensor
        else:
            centred = rows.to(centring_dtype)  # [n, D], a copy that may be changed in place
            shift = centred.mean(dim=0)  # [D]
            centred.sub_(shift)
        return shift, centred.to(self.product_dtype).contiguous()

    def _product(self, centred: torch.Tensor) -> torch.Tensor:
        """Return ``centred^T centred`` ``[D, D]``; on the CPU only its upper triangle is filled."""
        if centred.device.type != "cpu":
            return centred.T @ centred  # [D, D]
        array = centred.numpy()  # [n, D], C order, shares memory
        syrk = blas.get_blas_funcs("syrk", (array,))
        # array.T is the Fortran-order [D, n] matrix A, so syrk returns A A^T
        # in Fortran order. Its lower triangle becomes the upper triangle of
        # the C-order view taken below.
        with _blas_controller().limit(limits=1):
            product = syrk(1.0, array.T, trans=0, lower=1)  # [D, D], Fortran order
        return torch.from_numpy(product.T)  # [D, D], C order

    def _check_finite(self, batch_sum: torch.Tensor, product: torch.Tensor) -> bool:
        """Record whether the batch is finite; return False when it must not be merged.

        NaN or Inf anywhere in a column makes that column's sum non-finite,
        and an overflowed product entry implies an overflowed diagonal entry.
        """
        finite = torch.isfinite(batch_sum).all() & torch.isfinite(product.diagonal()).all()
        if self._nonfinite_seen is not None:
            self._nonfinite_seen |= ~finite
            return True
        if not bool(finite):
            self._finite = False
            return False
        return True

    def _merge(
        self, n_batch: int, shift: torch.Tensor, batch_sum: torch.Tensor, product: torch.Tensor
    ) -> None:
        """Merge one batch's moments into the running float64 moments (Chan et al.)."""
        batch_mean = shift.to(torch.float64) + batch_sum / n_batch  # [D]
        total = self.count + n_batch
        delta = batch_mean - self.mean  # [D]
        self.mean += delta * (n_batch / total)

        # M2 += P - s s^T / n + delta delta^T * count n / total, where P is the
        # product about the shift and s the sum of (row - shift). The first
        # rank-1 term moves the batch's centre from the shift to its mean.
        self._m2_upper += product
        left = torch.stack([batch_sum, delta], dim=1)  # [D, 2]
        right = torch.stack([batch_sum * (-1.0 / n_batch), delta * (self.count * n_batch / total)])
        self._m2_upper.addmm_(left, right)  # right: [2, D]
        self.count = total

    def covariance(self) -> torch.Tensor:
        """Return the unbiased covariance ``M2 / (N - 1)`` as float64 ``[D, D]``.

        Raises ValueError with fewer than two rows, since the unbiased
        estimate is undefined there.
        """
        if self.count < 2:
            raise ValueError(f"covariance needs at least 2 tokens, got {self.count}")
        upper = torch.triu(self._m2_upper)  # [D, D]
        symmetric = upper + torch.triu(self._m2_upper, diagonal=1).T  # [D, D]
        return symmetric.div_(self.count - 1)


class LinearMapCovariance:
    """Covariance of ``y = x W^T + b``, accumulated from the inputs ``x`` of the linear map.

    Because ``Cov(y) = W Cov(x) W^T`` exactly, the ``[D, D]`` covariance of
    the map's output follows from the ``[d_in, d_in]`` covariance of its
    input. When ``d_in < D``, as for the up or gate projection of an FFN
    (``d_in`` = hidden size, ``D`` = FFN width), each token costs
    ``(d_in / D)^2`` of the multiply-adds, and the ``D - d_in`` directions
    outside the range of ``W`` get eigenvalues at float64 rounding level
    whatever ``product_dtype`` is, where float32 products of the output itself
    would leave noise of about 1e-7 of the largest eigenvalue there.

    It has the interface of :class:`StreamingCovariance`, except that
    :meth:`update` takes input rows ``[n, d_in]``.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        device: torch.device | str = "cpu",
        product_dtype: torch.dtype = torch.float64,
    ) -> None:
        if weight.ndim != 2:
            raise ValueError(f"weight must have shape [D, d_in], got {tuple(weight.shape)}")
        self.device = torch.device(device)
        self.weight = weight.detach().to(self.device, torch.float64)  # [D, d_in]
        self.bias = None if bias is None else bias.detach().to(self.device, torch.float64)  # [D]
        self.dim = self.weight.shape[0]
        self.product_dtype = product_dtype
        self.inputs = StreamingCovariance(self.weight.shape[1], self.device, product_dtype)
        # A NaN or Inf weight or bias makes the outputs non-finite even when the inputs are finite.
        self.parameters_finite = bool(torch.isfinite(self.weight).all()) and (
            self.bias is None or bool(torch.isfinite(self.bias).all())
        )

    @property
    def count(self) -> int:
        return self.inputs.count

    @property
    def finite(self) -> bool:
        return self.parameters_finite and self.inputs.finite

    @property
    def mean(self) -> torch.Tensor:
        """Mean of the outputs ``W mean(x) + b``, float64 ``[D]``."""
        mean = self.weight @ self.inputs.mean  # [D]
        return mean if self.bias is None else mean + self.bias

    def update(self, rows: torch.Tensor) -> None:
        """Add a batch of input rows ``[n, d_in]`` of the linear map."""
        self.inputs.update(rows)

    def covariance(self) -> torch.Tensor:
        """Return the unbiased covariance of the outputs, ``W Cov(x) W^T``, float64 ``[D, D]``."""
        projected = self.weight @ self.inputs.covariance() @ self.weight.T  # [D, D]
        return projected.add_(projected.T.clone()).mul_(0.5)  # exactly symmetric

    def eigenvalues(self) -> torch.Tensor:
        """Return the eigenvalues of :meth:`covariance`, float64 ``[D]``, ascending.

        With ``Cov(x) = V L V^T`` and ``B = W V L^(1/2)`` (``[D, d_in]``), the
        covariance is ``B B^T``, whose non-zero eigenvalues are those of the
        ``[d_in, d_in]`` matrix ``B^T B``; the other ``D - d_in`` are exactly
        zero. This replaces one ``D x D`` solve by two ``d_in x d_in`` ones.
        """
        if self.inputs.dim >= self.dim:
            return _solve_symmetric(self.covariance()[None])[0]  # no smaller problem exists
        input_covariance = self.inputs.covariance()  # [d_in, d_in]
        try:
            return _linear_map_eigenvalues(self.weight, input_covariance)
        except (RuntimeError, torch.linalg.LinAlgError) as error:
            if self.device.type == "cpu":
                raise
            logger.warning(
                "eigenvalue solve failed on %s (%s); retrying on the CPU in float64",
                self.device,
                error,
            )
            return _linear_map_eigenvalues(self.weight.cpu(), input_covariance.cpu())


def _linear_map_eigenvalues(weight: torch.Tensor, input_covariance: torch.Tensor) -> torch.Tensor:
    """Return the eigenvalues of ``W C W^T`` (ascending) from those of ``[d_in, d_in]`` problems."""
    input_values, input_vectors = torch.linalg.eigh(input_covariance)
    root = input_vectors * input_values.clamp(min=0).sqrt()  # [d_in, d_in]
    mapped = weight @ root  # [D, d_in]
    values = torch.linalg.eigvalsh(mapped.T @ mapped)  # [d_in]
    zeros = values.new_zeros(weight.shape[0] - values.shape[0])
    return torch.cat([zeros, values]).sort().values


@functools.cache
def _blas_controller() -> ThreadpoolController:
    """Return a controller of the BLAS libraries loaded with numpy and scipy (OpenBLAS).

    ``syrk`` runs on one OpenBLAS thread because idle OpenBLAS threads keep
    spinning for a while after each call and so slow the forward pass that
    follows on the same cores. On the 2-core machine in BENCHMARKS.md that
    cost more than the second thread saved.
    """
    return ThreadpoolController().select(user_api="blas")


# Anything with ``update``, ``covariance()``, ``count``, ``finite``, ``dim`` and ``device``.
CovarianceAccumulator = StreamingCovariance | LinearMapCovariance


def compute_eigenvalues(covariances: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Return the eigenvalues of symmetric matrices, float64, sorted descending.

    Matrices of equal size are solved in one batched ``eigvalsh`` call on
    their device. A solve that fails there (e.g. a device solver that does not
    converge) is retried on the CPU in float64. Negative rounding noise is
    kept; callers clip it (see ``metrics.clip_eigenvalues``).
    """
    results: list[np.ndarray | None] = [None] * len(covariances)
    by_size: dict[tuple[int, torch.device], list[int]] = {}
    for index, matrix in enumerate(covariances):
        by_size.setdefault((matrix.shape[0], matrix.device), []).append(index)

    for indices in by_size.values():
        stacked = torch.stack([covariances[i].to(torch.float64) for i in indices])  # [k, D, D]
        with _cpu_solver_threads(stacked.device):
            values = _solve_symmetric(stacked)  # [k, D], ascending
        for row, index in zip(values, indices, strict=True):
            results[index] = row.flip(0).cpu().numpy()
    return results  # type: ignore[return-value]


def compute_covariance_eigenvalues(
    accumulators: Sequence[CovarianceAccumulator],
) -> list[np.ndarray]:
    """Return the eigenvalues of each accumulator's covariance, float64, sorted descending.

    A :class:`LinearMapCovariance` is solved through its input covariance.
    For the others, only a few covariance matrices exist at a time. On a GPU
    that is as many as fit in half the free memory, solved in one batched
    call. On the CPU it is one, solved with a single intra-op thread. On the
    2-core machine in BENCHMARKS.md that took 0.25 s for D = 1536 against
    0.16 s with two threads when idle, but two threads took 2 to 3 s when
    other processes shared the cores, because the tridiagonal reduction
    synchronises the threads once per column.
    """
    results: list[np.ndarray | None] = [None] * len(accumulators)
    direct = [i for i, acc in enumerate(accumulators) if not isinstance(acc, LinearMapCovariance)]
    for indices in _solver_chunks(accumulators, direct):
        stacked = torch.stack([accumulators[i].covariance() for i in indices])  # [k, D, D]
        with _cpu_solver_threads(stacked.device):
            values = _solve_symmetric(stacked)  # [k, D], ascending
        del stacked
        for row, index in zip(values, indices, strict=True):
            results[index] = row.flip(0).cpu().numpy()

    for index, accumulator in enumerate(accumulators):
        if isinstance(accumulator, LinearMapCovariance):
            with _cpu_solver_threads(accumulator.device):
                results[index] = accumulator.eigenvalues().flip(0).cpu().numpy()
    return results  # type: ignore[return-value]


def _solver_chunks(
    accumulators: Sequence[CovarianceAccumulator], indices: list[int]
) -> Iterator[list[int]]:
    """Split ``indices`` into runs of equal width and device that fit one batched solve."""
    start = 0
    while start < len(indices):
        first = accumulators[indices[start]]
        limit = _max_batched_solves(first.dim, first.device)
        stop = start + 1
        while (
            stop < len(indices)
            and stop - start < limit
            and accumulators[indices[stop]].dim == first.dim
            and accumulators[indices[stop]].device == first.device
        ):
            stop += 1
        yield indices[start:stop]
        start = stop


def _max_batched_solves(dim: int, device: torch.device) -> int:
    """Return how many ``dim x dim`` float64 problems one batched call may hold on ``device``."""
    if device.type != "cuda":
        return 1  # CPU LAPACK solves a batch one matrix after another anyway
    free_bytes, _ = torch.cuda.mem_get_info(device)
    per_matrix = _SOLVER_COPIES * dim * dim * 8
    return max(1, int(0.5 * free_bytes) // per_matrix)


@contextlib.contextmanager
def _cpu_solver_threads(device: torch.device) -> Iterator[None]:
    """Run the enclosed CPU eigenvalue solve with one intra-op thread, then restore the setting."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
