"""Initialization of a dictionary: b_dec from the data, decoder directions, encoder = decoderᵀ."""

from __future__ import annotations

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


def random_unit_rows(rows: int, dim: int, generator: torch.Generator | None = None) -> Tensor:
    weight = torch.randn(rows, dim, generator=generator)
    return weight / weight.norm(dim=1, keepdim=True)
