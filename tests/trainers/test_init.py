"""Initialization: b_dec estimators, the principal subspace and its rank rule, unit rows in the span, the
norm search, b_enc from the mean pre-activation and input normalization."""

import pytest
import torch

from trainers import init
from trainers.init import decoder_bias, geometric_median, principal_subspace, random_unit_rows, subspace_unit_rows
from trainers.sae import SAEConfig, SparseAutoencoder


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


def test_grid_search_picks_the_argmin_of_a_known_curve():
    grid = [0.1, 0.2, 0.4, 0.8, 1.6]
    best, losses = init.grid_search(lambda c: (c - 0.75) ** 2, grid)
    assert best == 0.8 and losses == [pytest.approx((c - 0.75) ** 2) for c in grid]
    assert init.grid_search(lambda c: 1.0, grid)[0] == 0.1  # ties: the first


def _duplicated_direction_sae(init_scale: str) -> tuple[SparseAutoencoder, torch.Tensor]:
    """Ten latents on the same direction e1, k = 10: x̂ = 10c·x₁e₁, so the best common scale is c = 1/10."""
    sae = SparseAutoencoder(SAEConfig(d_in=2, latents=10, k=10, initialization="random", init_scale=init_scale,
                                      b_dec_init="mean"))
    x = torch.tensor([[3.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0]] * 10))
        sae.W_enc.copy_(sae.W_dec)
        sae.b_dec.copy_(x.mean(dim=0) - torch.tensor([5.0, 0.0]))  # every centred x₁ > 0: both latents fire
    return sae, x - sae.b_dec.detach()


def test_norm_search_finds_the_known_scale_and_agrees_with_least_squares():
    searched, centred = _duplicated_direction_sae("norm_search")
    best = searched._search_encoder_scale(centred)
    assert best == pytest.approx(0.1, rel=1e-9)  # 10^-1 is a grid point; its neighbours are ×1.58 off
    torch.testing.assert_close(searched.W_enc.detach(), torch.tensor([[best, 0.0]] * 10))
    fitted, centred = _duplicated_direction_sae("least_squares")
    assert fitted._fit_encoder_scale(centred) == pytest.approx(0.1)


def test_norm_search_initialization_lands_within_a_grid_step_of_the_least_squares_scale():
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(0)) @ torch.randn(16, 16) + 1.0
    scales = {}
    for how in ("least_squares", "norm_search"):
        sae = SparseAutoencoder(SAEConfig(d_in=16, latents=256, k=8, init_scale=how))
        scales[how] = sae.initialize(x, torch.Generator().manual_seed(3))["encoder_scale"]
    step = init.NORM_SEARCH_GRID[1] / init.NORM_SEARCH_GRID[0]
    assert 1 / step <= scales["norm_search"] / scales["least_squares"] <= step, scales


def test_b_enc_from_the_mean_preactivation_and_rank_fraction():
    x = torch.randn(400, 16, generator=torch.Generator().manual_seed(1)) * 3 + 2
    sae = SparseAutoencoder(SAEConfig(d_in=16, latents=64, k=4, b_enc_init="mean_preactivation",
                                      subspace_rank_fraction=0.5))
    info = sae.initialize(x, torch.Generator().manual_seed(0))
    assert info["subspace_rank"] == 8
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    torch.testing.assert_close(pre.mean(dim=0), torch.zeros(64), atol=1e-4, rtol=0)
    assert float(sae.b_enc.detach().abs().max()) > 0  # geometric-median b_dec: the mean pre-activation is not 0
    with pytest.raises(ValueError, match="not both"):
        init.rank_of(16, 0.99, 4, 0.5)


def test_input_normalization_is_one_factor_and_changes_no_reconstruction():
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(2)) * 40 + 5
    plain = SparseAutoencoder(SAEConfig(d_in=16, latents=64, k=4))
    normalized = SparseAutoencoder(SAEConfig(d_in=16, latents=64, k=4, normalize_inputs=True))
    plain.initialize(x, torch.Generator().manual_seed(0))
    info = normalized.initialize(x, torch.Generator().manual_seed(0))
    factor = float(normalized.input_norm_factor)
    assert info["input_norm_factor"] == pytest.approx(factor)
    assert float((x * factor).pow(2).sum(dim=1).mean()) == pytest.approx(1.0, rel=1e-5)
    with torch.no_grad():  # every init step is scale-equivariant: the same dictionary, in other units
        torch.testing.assert_close(normalized(x).x_hat, plain(x).x_hat, rtol=1e-3, atol=1e-3 * 40)
        torch.testing.assert_close(normalized.b_dec / factor, plain.b_dec, rtol=1e-3, atol=1e-2)
