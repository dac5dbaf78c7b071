"""Initialization of a dictionary: b_dec from the data, decoder directions, encoder = decoderᵀ.

`subspace` (arXiv 2508.16929): activations of attention outputs occupy a low-dimensional subspace; random
decoder directions pointing outside it never fire. So: centre a sample, take the principal directions that
hold `variance_share` of the variance (or an explicit rank, or a fraction of d), and draw every decoder row
inside their span. The paper's code then picks one common decoder-row norm by a grid search for the lowest
reconstruction loss on the sample, may set b_enc = −(mean pre-activation), and normalizes inputs dataset-wise;
those are options here (trainers/sae.py), next to our least-squares encoder scale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def geometric_median(points: Tensor, iterations: int = 50, tol: float = 1e-6) -> Tensor:
    """Weiszfeld iterations: the point minimising the sum of Euclidean distances to `points` [N, d]."""
    median = points.mean(dim=0)
    for _ in range(iterations):
        distances = (points - median).norm(dim=1).clamp_min(1e-8)
        weights = 1.0 / distances
        updated = (weights[:, None] * points).sum(dim=0) / weights.sum()
        shift = (updated - median).norm()
        median = updated
        if shift <= tol * median.norm().clamp_min(1.0):
            break
    return median


def decoder_bias(sample: Tensor, method: str = "geometric_median") -> Tensor:
    """b_dec from a sample [N, d]: `geometric_median` (Gao et al.; robust to outlier tokens) or `mean`."""
    if method == "geometric_median":
        return geometric_median(sample)
    if method == "mean":
        return sample.mean(dim=0)
    raise ValueError(f"b_dec_init must be 'geometric_median' or 'mean'; got {method!r}")


ROW_BLOCK = 16_384  # rows drawn from one seed: a shard draws only the blocks its latents fall in


def gaussian_rows(start: int, stop: int, width: int, seed: int) -> Tensor:
    """Rows start..stop-1 of an endless [∞, width] standard normal matrix fixed by `seed`: any latent range
    gets the same values for its rows whether one rank draws all of them or a shard only its own, without
    the whole [latents, width] matrix (2.3 GiB at 1M latents × 576) ever being held on a shard."""
    out = torch.empty(max(stop - start, 0), width)
    for block in range(start // ROW_BLOCK, (stop - 1) // ROW_BLOCK + 1):  # each block drawn whole, kept in part
        values = torch.randn(ROW_BLOCK, width, generator=torch.Generator().manual_seed(seed * 1_000_003 + block))
        lo, hi = max(start, block * ROW_BLOCK), min(stop, (block + 1) * ROW_BLOCK)
        out[lo - start:hi - start] = values[lo - block * ROW_BLOCK:hi - block * ROW_BLOCK]
    return out  # held once: filled block by block, not concatenated from a list of blocks


def random_unit_rows(start: int, stop: int, dim: int, seed: int) -> Tensor:
    """Rows start..stop-1 of a random dictionary of unit rows fixed by `seed` (see gaussian_rows)."""
    weight = gaussian_rows(start, stop, dim, seed)
    return weight / weight.norm(dim=1, keepdim=True)


def principal_subspace(sample: Tensor, variance_share: float = 0.99, rank: int | None = None
                       ) -> tuple[Tensor, dict[str, float]]:
    """Orthonormal basis [r, d] of the top-r principal directions of `sample` [N, d] (centred on its mean).

    r = `rank` if given, else the smallest rank whose directions hold `variance_share` of the variance.
    The covariance is eigendecomposed in float64: d×d is small, and the tail eigenvalues that decide r are
    tiny next to the leading ones.
    """
    if sample.dim() != 2 or sample.shape[0] < 2:
        raise ValueError(f"a sample [N >= 2, d] is needed for the subspace; got {tuple(sample.shape)}")
    d = sample.shape[1]
    if rank is not None and not 0 < rank <= d:
        raise ValueError(f"subspace_rank must be in 1..{d} (the activation width); got {rank}")
    if not 0.0 < variance_share <= 1.0:
        raise ValueError(f"variance_share must be in (0, 1]; got {variance_share}")
    centred = sample.double() - sample.double().mean(dim=0)
    covariance = centred.T @ centred / (sample.shape[0] - 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    eigenvalues = eigenvalues.flip(0).clamp_min(0)
    eigenvectors = eigenvectors.flip(1)
    shares = eigenvalues.cumsum(0) / eigenvalues.sum().clamp_min(1e-30)
    if rank is None:
        rank = int(torch.searchsorted(shares, torch.tensor(variance_share, dtype=shares.dtype)).item()) + 1
        rank = min(rank, d)
    basis = eigenvectors[:, :rank].T.contiguous().to(sample.dtype)
    info = {"subspace_rank": float(rank), "subspace_rank_fraction": rank / d,
            "subspace_variance_share": float(shares[rank - 1])}
    return basis, info


def subspace_unit_rows(start: int, stop: int, basis: Tensor, seed: int) -> Tensor:
    """Rows start..stop-1 of unit vectors with Gaussian coefficients (fixed by `seed`) in the span of the
    orthonormal `basis` [r, d]."""
    coefficients = gaussian_rows(start, stop, basis.shape[0], seed).to(basis.device, basis.dtype)
    weight = coefficients @ basis
    return weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12)


def rank_of(d: int, variance_share: float, rank: int | None, rank_fraction: float | None) -> int | None:
    """The explicit subspace rank, if one is asked for: `rank`, or round(rank_fraction · d) (at least 1); None
    means "by variance share" (principal_subspace picks it)."""
    if rank is not None and rank_fraction is not None:
        raise ValueError("give subspace_rank or subspace_rank_fraction, not both")
    if rank_fraction is not None:
        if not 0.0 < rank_fraction <= 1.0:
            raise ValueError(f"subspace_rank_fraction must be in (0, 1]; got {rank_fraction}")
        return max(1, round(rank_fraction * d))
    return rank


# The common encoder scales c tried by the norm search (W_enc = c · unit rows, W_dec unit rows): with tied
# weights of row norm s (the paper's W_E = W_Dᵀ), the reconstruction is s² Σ (ŵ·x) ŵ, so c plays s².
# 21 points, ×1.58 apart (a forward pass of the init sample each).
NORM_SEARCH_GRID = tuple(float(c) for c in torch.logspace(-3, 1, 21, dtype=torch.float64))


def grid_search(loss_of: Callable[[float], float], grid: Sequence[float]) -> tuple[float, list[float]]:
    """The grid value with the lowest loss_of(value) (the first on ties), and every loss in grid order."""
    losses = [float(loss_of(value)) for value in grid]
    best = min(range(len(grid)), key=lambda i: (losses[i], i))
    return float(grid[best]), losses


def unit_mean_square_factor(sample: Tensor) -> float:
    """f with mean ‖f·x‖² = 1 over `sample` [N, d]: the dataset-wise input normalization (one scalar). SAELens's
    `expected_average_only_in` scales to mean ‖x‖ = √d instead — a constant multiple, folded away the same way."""
    return float(sample.double().pow(2).sum(dim=1).mean().rsqrt())
