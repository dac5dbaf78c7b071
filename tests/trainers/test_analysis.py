"""The streaming per-latent statistics and the per-dictionary analyses against brute-force references."""

import numpy as np
import pytest
import torch

from trainers.analysis import (
    LatentStatistics,
    logit_effects,
    nearest_latents,
    sample_keys,
    sparse_code,
)

M, K, WINDOW, BEFORE, AFTER, N = 40, 3, 16, 4, 2, 5


def _batches(seed: int, count: int = 6, windows: int = 3):
    """Sparse codes of `count` batches of `windows` windows; distinct random values, some zero slots."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(count):
        t = windows * WINDOW
        indices = torch.stack([torch.randperm(M, generator=g)[:K] for _ in range(t)])
        values = torch.rand(t, K, generator=g) * 4
        values[torch.rand(t, K, generator=g) < 0.2] = 0
        keep = torch.rand(t, generator=g) > 0.1
        yield values, indices, keep


def _run(seed: int):
    stats = LatentStatistics(M, top_n=N, before=BEFORE, after=AFTER, bins=8)
    dense, position, kept = [], 0, 0
    for values, indices, keep in _batches(seed):
        kept += int(keep.sum())
        stats.update(values, indices, position, WINDOW, keep)
        z = torch.zeros(len(values), M)
        z.scatter_(1, indices, values * keep[:, None])
        dense.append(z)
        position += len(values)
    assert stats.tokens == kept, "tokens counts the kept (non-special) tokens"
    return stats, torch.cat(dense)


def _context(z: torch.Tensor, position: int, latent: int) -> np.ndarray:
    out = np.zeros(BEFORE + 1 + AFTER, dtype=np.float32)
    for c, p in enumerate(range(position - BEFORE, position + AFTER + 1)):
        if 0 <= p < len(z) and p // WINDOW == position // WINDOW:
            out[c] = z[p, latent]
    return out


def test_counts_means_maxima_match_a_dense_computation():
    stats, z = _run(0)
    fires = z > 0
    assert torch.equal(stats.count, fires.sum(0))
    assert torch.allclose(stats.max, z.max(0).values)
    mean = torch.where(fires.sum(0) > 0, z.sum(0).double() / fires.sum(0).clamp_min(1), torch.zeros(M).double())
    assert torch.allclose(stats.mean(), mean, atol=1e-6)


def test_top_n_has_the_same_positions_values_and_contexts_as_a_brute_force():
    stats, z = _run(1)
    top = stats.top_examples()
    for latent in range(M):
        column = z[:, latent]
        fired = torch.nonzero(column > 0).squeeze(1)
        best = fired[torch.argsort(column[fired], descending=True)][:N]
        got = top.positions[latent]
        assert got[: len(best)].tolist() == best.tolist(), f"latent {latent}: top positions differ"
        assert (got[len(best):] == -1).all()
        assert torch.allclose(top.values[latent, : len(best)], column[best])
        for slot, position in enumerate(best.tolist()):
            np.testing.assert_allclose(top.contexts[latent, slot].float().numpy(),
                                       _context(z, position, latent), atol=4e-3, rtol=2e-3)


def test_the_quantile_sample_is_the_firings_with_the_largest_keys_sorted_by_activation():
    stats, z = _run(2)
    sample = stats.quantile_examples()
    for latent in range(M):
        fired = torch.nonzero(z[:, latent] > 0).squeeze(1)
        keys = sample_keys(fired, torch.full_like(fired, latent))
        chosen = fired[torch.argsort(keys, descending=True)][:N]
        got = sample.positions[latent][sample.positions[latent] >= 0]
        assert sorted(got.tolist()) == sorted(chosen.tolist()), f"latent {latent}: sampled firings differ"
        values = sample.values[latent, : len(got)]
        assert torch.all(values[:-1] >= values[1:]), "quantile examples are sorted by activation"
        for slot, position in enumerate(got.tolist()):
            np.testing.assert_allclose(sample.contexts[latent, slot].float().numpy(),
                                       _context(z, position, latent), atol=4e-3, rtol=2e-3)


def test_signed_codes_fire_either_way_and_rank_by_magnitude():
    """AbsTopK: a negative code is a firing; count, mean (signed), max |a|, the histogram's range and the top-N
    (by |a|, values keeping their sign) against a dense computation."""
    stats = LatentStatistics(M, top_n=N, before=BEFORE, after=AFTER, bins=8, signed=True)
    dense, position = [], 0
    g = torch.Generator().manual_seed(7)
    for values, indices, keep in _batches(3):
        values = values * torch.where(torch.rand(values.shape, generator=g) < 0.5, -1.0, 1.0)
        stats.update(values, indices, position, WINDOW, keep)
        dense.append(torch.zeros(len(values), M).scatter_(1, indices, values * keep[:, None]))
        position += len(values)
    z = torch.cat(dense)
    fires = z != 0
    assert bool((z < 0).any()), "the case has negative codes"
    assert torch.equal(stats.count, fires.sum(0))
    assert torch.allclose(stats.max, z.abs().max(0).values)
    mean = torch.where(fires.sum(0) > 0, z.sum(0).double() / fires.sum(0).clamp_min(1), torch.zeros(M).double())
    assert torch.allclose(stats.mean(), mean, atol=1e-6)
    assert torch.equal(stats.histogram.sum(1), stats.count)
    top = stats.top_examples()
    for latent in range(M):
        column = z[:, latent]
        fired = torch.nonzero(column != 0).squeeze(1)
        best = fired[torch.argsort(column[fired].abs(), descending=True)][:N]
        assert top.positions[latent][: len(best)].tolist() == best.tolist(), f"latent {latent}: top differs"
        assert torch.allclose(top.values[latent, : len(best)], column[best])  # the sign kept
        sample = stats.quantile_examples().values[latent]
        magnitudes = sample[stats.quantile_examples().positions[latent] >= 0].abs()
        assert torch.all(magnitudes[:-1] >= magnitudes[1:]), "quantile examples are sorted by |activation|"


def test_sample_keys_look_uniform():
    keys = sample_keys(torch.arange(200_000), torch.arange(200_000) % 7)
    assert 0 <= float(keys.min()) and float(keys.max()) < 1
    assert abs(float(keys.mean()) - 0.5) < 0.01
    counts = torch.histc(keys, bins=10, min=0, max=1)
    assert float(counts.max() / counts.min()) < 1.05


def test_the_rebinned_histogram_equals_one_made_at_the_final_range():
    stats, z = _run(3)
    upper = stats.histogram_upper()
    for latent in range(M):
        values = z[:, latent][z[:, latent] > 0]
        if not len(values):
            assert upper[latent] == 0 and stats.histogram[latent].sum() == 0
            continue
        exponent = int(torch.frexp(values.max()).exponent)
        assert float(upper[latent]) == 2.0 ** exponent
        bins = (values * 8 / 2.0 ** exponent).floor().long().clamp(max=7)
        assert stats.histogram[latent].tolist() == torch.bincount(bins, minlength=8).tolist()


def test_bins_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        LatentStatistics(4, bins=12)


def _tensors(d: int, m: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d, m, generator=g), "b_enc": torch.randn(m, generator=g) * 0.1,
            "b_dec": torch.randn(d, generator=g) * 0.1, "W_dec": torch.randn(m, d, generator=g),
            "threshold": torch.rand(m, generator=g) * 2}


@pytest.mark.parametrize("architecture", ["topk", "jumprelu", "standard"])
def test_sparse_code_matches_the_dense_encoder(architecture):
    tensors = _tensors(8, 50)
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(1))
    pre = (x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    if architecture == "topk":
        dense = torch.zeros_like(pre).scatter_(1, pre.relu().topk(4, dim=1).indices, pre.relu().topk(4, dim=1).values)
    elif architecture == "jumprelu":
        dense = pre * (pre > tensors["threshold"])
    else:
        dense = pre.relu()
    values, indices = sparse_code(x, {k: v for k, v in tensors.items() if architecture == "jumprelu"
                                      or k != "threshold"}, architecture, 4, chunk=16)
    rebuilt = torch.zeros_like(pre).scatter_add_(1, indices, values)
    assert torch.allclose(rebuilt, dense, atol=1e-5)


@pytest.mark.parametrize("centre", [False, True])
def test_logit_effects_are_the_top_and_bottom_of_the_dense_product(centre):
    g = torch.Generator().manual_seed(2)
    W_dec, W_U, gamma = torch.randn(30, 8, generator=g), torch.randn(100, 8, generator=g), torch.rand(8, generator=g)
    top_v, top_i, low_v, low_i = logit_effects(W_dec, W_U, gamma, centre, top=5, chunk=7)
    directions = (W_dec - W_dec.mean(1, keepdim=True) if centre else W_dec) * gamma
    effects = directions @ W_U.T
    assert torch.allclose(top_v, effects.topk(5, dim=1).values, atol=1e-5)
    assert torch.equal(top_i, effects.topk(5, dim=1).indices)
    assert torch.allclose(low_v, effects.topk(5, dim=1, largest=False).values, atol=1e-5)
    assert torch.equal(low_i, effects.topk(5, dim=1, largest=False).indices)


def test_nearest_latents_exact_and_sampled():
    W_dec = torch.randn(300, 16, generator=torch.Generator().manual_seed(3))
    unit = W_dec / W_dec.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    cos.fill_diagonal_(float("-inf"))
    values, indices, method = nearest_latents(W_dec, count=4, chunk=64)
    assert method.startswith("exact")
    assert torch.equal(indices, cos.topk(4, dim=1).indices)
    assert torch.allclose(values, cos.topk(4, dim=1).values, atol=1e-5)

    values, indices, method = nearest_latents(W_dec, count=4, chunk=64, exact_up_to=100, seed=5)
    assert method.startswith("sampled") and "100 of the 300" in method
    pool = torch.randperm(300, generator=torch.Generator().manual_seed(5))[:100].sort().values
    assert torch.isin(indices, pool).all()
    assert not (indices == torch.arange(300)[:, None]).any(), "a latent is never its own neighbour"
    expected = cos[:, pool].topk(4, dim=1)
    assert torch.allclose(values, expected.values, atol=1e-5)
