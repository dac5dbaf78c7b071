"""Initialization: b_dec estimators, the principal subspace and its rank rule, unit rows in the span."""

import pytest
import torch

from trainers import init
from trainers.init import decoder_bias, geometric_median, principal_subspace, random_unit_rows, subspace_unit_rows


def test_geometric_median_resists_outliers_and_mean_does_not():
    g = torch.Generator().manual_seed(0)
    points = torch.randn(500, 4, generator=g) * 0.1 + 1.0
    points[:40] = 1000.0
    assert torch.allclose(geometric_median(points), torch.ones(4), atol=0.1)
    assert float(decoder_bias(points, "mean").mean()) > 50
    with pytest.raises(ValueError, match="b_dec_init"):
        decoder_bias(points, "median")


def test_rank_holds_the_variance_share():
    g = torch.Generator().manual_seed(1)
    scales = torch.tensor([10.0, 5.0, 3.0, 1.0, 0.1, 0.01, 0.01, 0.01])
    x = torch.randn(20000, 8, generator=g) * scales
    basis, info = principal_subspace(x, variance_share=0.99)
    variances = scales**2
    expected = int((variances.cumsum(0) / variances.sum() < 0.99).sum()) + 1
    assert info["subspace_rank"] == expected == 3
    assert info["subspace_variance_share"] >= 0.99
    assert torch.allclose(basis @ basis.T, torch.eye(3), atol=1e-5)
    _, full = principal_subspace(x, variance_share=1.0)
    assert full["subspace_rank"] == 8
    _, explicit = principal_subspace(x, rank=2)
    assert explicit["subspace_rank"] == 2 and explicit["subspace_rank_fraction"] == 0.25
    with pytest.raises(ValueError, match="subspace_rank"):
        principal_subspace(x, rank=9)


def test_rows_are_unit_and_inside_the_span():
    basis = torch.linalg.qr(torch.randn(10, 3)).Q.T
    rows = subspace_unit_rows(0, 100, basis, seed=0)
    assert torch.allclose(rows.norm(dim=1), torch.ones(100), atol=1e-5)
    assert float((rows - rows @ basis.T @ basis).abs().max()) < 1e-5
    assert torch.allclose(random_unit_rows(0, 7, 5, seed=0).norm(dim=1), torch.ones(7), atol=1e-6)


def test_a_latent_range_draws_its_rows_of_the_whole_dictionary(monkeypatch):
    monkeypatch.setattr(init, "ROW_BLOCK", 8)  # ranges that start and end inside blocks and span several
    whole = init.gaussian_rows(0, 40, 3, seed=5)
    for start, stop in [(0, 40), (3, 5), (6, 19), (16, 24), (39, 40), (7, 7)]:
        assert torch.equal(init.gaussian_rows(start, stop, 3, seed=5), whole[start:stop]), (start, stop)
    assert not torch.equal(init.gaussian_rows(0, 40, 3, seed=6), whole)
    basis = torch.linalg.qr(torch.randn(4, 2)).Q.T
    assert torch.equal(subspace_unit_rows(10, 30, basis, seed=1), subspace_unit_rows(0, 40, basis, seed=1)[10:30])
