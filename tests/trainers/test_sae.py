"""The dictionary: every architecture trains, TopK matches a dense reference, exports load in SAELens."""

import json

import pytest
import torch

from trainers.kernels import sparse_decode
from trainers.metrics import FiringTracker
from trainers.sae import LATENT_PARAMETERS, SAEConfig, SparseAutoencoder, sae_config_from_spec, unit_rows

ARCHS = ["topk", "batchtopk", "abstopk", "matryoshka_topk", "matryoshka_batchtopk", "jumprelu", "relu"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: on 2 busy cores intra-op threading only adds contention (20x slower steps seen)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sparse_data(n=2048, d=16, atoms=48, active=3, seed=0):
    """Tokens that are sums of a few of `atoms` random directions: a dictionary can recover them."""
    g = torch.Generator().manual_seed(seed)
    dictionary = unit_rows(torch.randn(atoms, d, generator=g))
    codes = torch.zeros(n, atoms)
    idx = torch.stack([torch.randperm(atoms, generator=g)[:active] for _ in range(n)])
    codes.scatter_(1, idx, torch.rand(n, active, generator=g) * 2 + 0.5)
    return codes @ dictionary + 0.3


def make(arch, latents=64, k=4, **kw):
    cfg = SAEConfig(d_in=16, latents=latents, k=k, architecture=arch, **kw)
    sae = SparseAutoencoder(cfg)
    x = sparse_data()
    info = sae.initialize(x[:1024], torch.Generator().manual_seed(0))
    return sae, x, info


def dense_select(pre, k, signed):
    """Row-wise top-k: of ReLU(pre) (TopK), or by |pre| keeping the sign (AbsTopK); -inf entries never win."""
    if signed:
        idx = pre.abs().topk(k, dim=1).indices
        return pre.gather(1, idx), idx
    return torch.relu(pre).topk(k, dim=1)


@pytest.mark.parametrize("arch", ["topk", "abstopk"])
def test_topk_matches_dense_reference_values_and_gradients(arch):
    sae, x, _ = make(arch, encoder_chunk=24)
    signed = arch == "abstopk"
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    out = sae(x[:64], dead)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()

    xs = x[:64]
    pre = (xs - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    acts, idx = dense_select(pre, 4, signed)
    if signed:
        assert bool((acts < 0).any()), "the comparison has no negative code"
    dense = torch.zeros(64, 64).scatter(1, idx, acts)
    x_hat = dense @ unit_rows(sae.W_dec) + sae.b_dec
    denom = (xs - xs.mean(0)).pow(2).sum()
    fvu = (xs - x_hat).pow(2).sum() / denom
    if signed:  # dead latents by magnitude: live ones are pushed below every dead |pre|
        aux_idx = torch.where(dead, pre.abs(), torch.full_like(pre, -1.0)).topk(sae.cfg.effective_k_aux, dim=1)[1]
        aux_acts = pre.gather(1, aux_idx)
    else:
        masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
        aux_acts, aux_idx = torch.relu(masked).topk(sae.cfg.effective_k_aux, dim=1)
    residual = (xs - x_hat).detach()
    residual_hat = torch.zeros(64, 64).scatter(1, aux_idx, aux_acts) @ unit_rows(sae.W_dec)
    with torch.no_grad():  # each token's AuxK decode scaled by its least-squares fit in [0, 1]
        fit = ((residual * residual_hat).sum(1, keepdim=True) / residual_hat.pow(2).sum(1, keepdim=True))
        fit = fit.nan_to_num(0.0).clamp(0.0, 1.0)
    auxk = (residual - fit * residual_hat).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
    loss = fvu + sae.cfg.auxk_alpha * auxk
    loss.backward()
    assert torch.allclose(out.x_hat, x_hat, atol=1e-5)
    assert torch.allclose(out.auxk_loss, auxk, atol=1e-5)
    for name, p in sae.named_parameters():
        assert torch.allclose(got[name], p.grad, atol=1e-5), name


def train(sae, x, steps=100, lr=5e-3):
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    tracker = FiringTracker(sae.cfg.latents, window_tokens=4096)
    for step in range(steps):
        batch = x[(step * 256) % x.shape[0]:][:256]
        out = sae(batch, tracker.dead_mask(), progress=step / steps)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        tracker.update(out.latent_acts.detach(), out.latent_indices)
    sae.eval()
    with torch.no_grad():
        final = sae(x)
    sae.train()
    return final


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_learns(arch):
    sae, x, _ = make(arch)
    start = float(sae(x).fvu.detach())
    final = train(sae, x)
    # TopK-style dictionaries start from the least-squares encoder scale (already FVU ~0.5 here), the others
    # from W_enc = W_dec (FVU ~1): each must at least reach 0.4 and gain a quarter on its start.
    assert float(final.fvu) < 0.75 * start and float(final.fvu) < 0.4, (start, float(final.fvu))
    l0 = float((final.latent_acts != 0).sum(1).float().mean())
    if arch in ("topk", "abstopk", "matryoshka_topk"):
        assert l0 <= 4
    if arch in ("batchtopk", "matryoshka_batchtopk"):
        assert float(sae.threshold) > 0
    if arch in ("jumprelu", "relu"):
        assert l0 < 32, l0  # the sparsity penalty bites (half of 64 latents fire at init)


def test_batchtopk_keeps_n_times_k_per_batch():
    sae, x, _ = make("batchtopk")
    out = sae(x[:100])
    assert int((out.latent_acts > 0).sum()) == 100 * 4
    assert out.latent_acts.shape == (100, 16)  # row cap 4k
    assert float(sae.threshold) > 0


def test_jumprelu_threshold_learns_and_warmup_scales_penalty():
    sae, x, _ = make("jumprelu")
    early = sae(x[:256], progress=0.0)
    late = sae(x[:256], progress=0.5)
    assert early.sparsity_coefficient == 0.0 and late.sparsity_coefficient == sae.cfg.l0_coefficient
    before = sae.log_threshold.detach().clone()
    train(sae, x, steps=40)
    assert not torch.equal(before, sae.log_threshold.detach())


def test_sparse_grads_match_dense_grads():
    sae, x, _ = make("topk", sparse_grads=True)
    dead = torch.rand(64) < 0.3
    sae(x[:128], dead).loss.backward()
    sparse = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone() for n, p in sae.named_parameters()}
    assert sae.W_enc.grad.is_sparse and sae.W_dec.grad.is_sparse
    dense_sae = SparseAutoencoder(SAEConfig(d_in=16, latents=64, k=4))
    dense_sae.load_state_dict(sae.state_dict())
    dense_sae(x[:128], dead).loss.backward()
    for name, p in dense_sae.named_parameters():
        assert torch.allclose(sparse[name], p.grad, atol=1e-6), name


def test_subspace_initialization_places_rows_in_the_span():
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(16, 5, generator=g)).Q.T  # 5 directions of 16
    x = torch.randn(2000, 5, generator=g) @ basis + 0.01 * torch.randn(2000, 16, generator=g)
    sae = SparseAutoencoder(SAEConfig(d_in=16, latents=64, k=4))
    info = sae.initialize(x, torch.Generator().manual_seed(0))
    assert info["subspace_rank"] == 5
    rows = sae.W_dec.detach()
    outside = rows - (rows @ basis.T) @ basis
    assert float(outside.norm(dim=1).max()) < 0.05
    assert torch.allclose(rows.norm(dim=1), torch.ones(64), atol=1e-5)
    # The encoder is the decoder's transpose times the one least-squares scale: the same directions.
    scale = info["encoder_scale"]
    assert 0 < scale and torch.allclose(sae.W_enc, scale * sae.W_dec, rtol=1e-5, atol=1e-6)
    explicit = SparseAutoencoder(SAEConfig(d_in=16, latents=64, k=4, subspace_rank=9))
    assert explicit.initialize(x)["subspace_rank"] == 9


def test_encoder_scale_is_the_least_squares_fit_on_the_sample():
    """Correlated rows (256 latents in a 4-dimensional span) overshoot with W_enc = W_dec; the fitted scale
    leaves the selection alone and minimises the sample's reconstruction error along the scale."""
    g = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(16, 4, generator=g)).Q.T
    x = torch.randn(512, 4, generator=g) @ basis
    sae = SparseAutoencoder(SAEConfig(d_in=16, latents=256, k=8, b_dec_init="mean"))
    scale = sae.initialize(x, torch.Generator().manual_seed(0))["encoder_scale"]
    assert scale < 0.5  # it was overshooting
    with torch.no_grad():
        fitted = sae(x)

        def error_at(factor: float) -> float:
            sae.W_enc.mul_(factor)
            out = sae(x)
            sae.W_enc.div_(factor)
            assert torch.equal(out.latent_indices.sort(dim=1).values, fitted.latent_indices.sort(dim=1).values)
            return float(out.fvu)

        assert float(fitted.fvu) < min(error_at(0.9), error_at(1.1), error_at(1 / scale))


def test_sae_config_from_spec_ignores_loop_fields_and_validates():
    spec = {"name": "attn-6", "hook": None, "architecture": "jumprelu", "latents": 128, "expansion_factor": None,
            "k": 32, "auxk_alpha": 0.03, "k_aux": None, "dead_window_tokens": 1000, "lr": None,
            "initialization": "random", "l0_coefficient": 0.01}
    cfg = sae_config_from_spec(spec, d_in=16)
    assert (cfg.architecture, cfg.latents, cfg.initialization, cfg.l0_coefficient) == ("jumprelu", 128, "random", 0.01)
    assert cfg.effective_k_aux == 8
    with pytest.raises(ValueError, match="architecture must be one of"):
        sae_config_from_spec({**spec, "architecture": "gated"}, d_in=16)
    with pytest.raises(ValueError, match="k must be in"):
        sae_config_from_spec({**spec, "architecture": "topk", "k": 500}, d_in=16)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_keeps_the_function(arch):
    sae, x, _ = make(arch)
    train(sae, x, steps=20)
    sae.eval()
    tensors = sae.export_tensors()
    assert torch.allclose(tensors["W_dec"].norm(dim=1), torch.ones(64), atol=1e-5)
    xs = x[:64]
    pre = (xs - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    cfg = sae.export_config()
    if cfg["architecture"] in ("topk", "abstopk"):
        acts, idx = dense_select(pre, cfg["k"], cfg["architecture"] == "abstopk")
        acts = torch.zeros_like(pre).scatter(1, idx, acts)
    elif cfg["architecture"] == "jumprelu":
        acts = torch.relu(pre) * (pre > tensors["threshold"])
    else:
        acts = torch.relu(pre)
    x_hat = acts @ tensors["W_dec"] + tensors["b_dec"]
    with torch.no_grad():
        ours = sae(xs).x_hat
    if "batchtopk" in arch:  # inference with θ differs from the training-time batch selection: compare FVU
        assert abs(float(((xs - x_hat) ** 2).sum() / ((xs - ours) ** 2).sum()) - 1) < 0.5
    else:
        assert torch.allclose(x_hat, ours, atol=1e-4)


def test_exports_load_in_saelens(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    from safetensors.torch import save_file

    for arch in ARCHS:
        sae, x, _ = make(arch)
        train(sae, x, steps=10)
        folder = tmp_path / arch
        folder.mkdir()
        save_file(sae.export_tensors(), str(folder / "sae_weights.safetensors"))
        cfg = {"d_in": 16, "d_sae": 64, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
               "normalize_activations": "none", "reshape_activations": "none", "metadata": {},
               **sae.export_config()}
        (folder / "cfg.json").write_text(json.dumps(cfg))
        loaded = sae_lens.SAE.load_from_disk(str(folder))
        sae.eval()
        with torch.no_grad():
            theirs = loaded(x[:64])
            ours = sae(x[:64]).x_hat
        if "batchtopk" in arch:  # SAELens applies θ to every latent; ours caps candidates per row first
            t = sae.export_tensors()
            pre = (x[:64] - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
            ours = (torch.relu(pre) * (pre > t["threshold"])) @ t["W_dec"] + t["b_dec"]
        assert torch.allclose(theirs, ours, atol=1e-4), arch


@pytest.mark.parametrize("arch,sparse_grads", [("matryoshka_topk", False), ("matryoshka_batchtopk", False),
                                               ("matryoshka_topk", True)])
def test_matryoshka_loss_is_the_sum_of_the_prefix_losses_dense_reference(arch, sparse_grads):
    """Prefixes 8, 24, 40 and 64 of 64 latents: the loss is Σ_p FVU_p, each prefix decoding the codes of its
    own latents; values, per-prefix metrics and every gradient against dense products (also as the row-sparse
    gradients the job's lazy Adam takes)."""
    sae, x, _ = make(arch, matryoshka_prefixes=[8, 24, 40], encoder_chunk=24, sparse_grads=sparse_grads)
    assert sae.cfg.prefix_ends == (8, 24, 40, 64)
    xs = x[:64]
    out = sae(xs)
    out.loss.backward()
    got = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone() for n, p in sae.named_parameters()}
    assert sae.W_dec.grad.is_sparse == sparse_grads
    sae.zero_grad()
    sae.W_enc.grad = sae.W_dec.grad = None

    codes = torch.zeros(64, 64).scatter(1, out.latent_indices, out.latent_acts.detach())
    pre = (xs - sae.b_dec) @ sae.W_enc.T + sae.b_enc  # the values again, through dense products
    dense = torch.where(codes != 0, torch.relu(pre), torch.zeros_like(pre))
    directions = unit_rows(sae.W_dec)
    denom = (xs - xs.mean(0)).pow(2).sum()
    fvus = [(xs - dense[:, :m] @ directions[:m] - sae.b_dec).pow(2).sum() / denom for m in (8, 24, 40, 64)]
    loss = sum(fvus)
    loss.backward()
    torch.testing.assert_close(out.loss.detach(), loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.fvu.detach(), fvus[-1].detach(), rtol=1e-5, atol=1e-6)
    for m, value in zip((8, 24, 40, 64), fvus, strict=True):
        torch.testing.assert_close(out.metrics[f"fvu_prefix_{m}"], value.detach(), rtol=1e-5, atol=1e-6)
        assert float(out.metrics[f"l0_prefix_{m}"]) == pytest.approx(float((codes[:, :m] != 0).sum(1).float().mean()))
    assert float(out.metrics["l0_prefix_8"]) > 0  # every group holds codes: each term is tested
    for name, p in sae.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ["matryoshka_topk", "matryoshka_batchtopk"])
def test_each_prefix_loss_equals_a_small_dictionary_on_the_same_weights(arch):
    """A separate dictionary of a prefix's m latents, holding the same rows, reconstructs from the same codes of
    those latents with the FVU that the Matryoshka forward reports for the prefix."""
    sae, x, _ = make(arch, matryoshka_prefixes=2)  # doubling: 32, 64
    train(sae, x, steps=10)
    xs = x[:128]
    with torch.no_grad():
        out = sae(xs)
        for m in sae.cfg.prefix_ends:
            small = SparseAutoencoder(SAEConfig(d_in=16, latents=m, k=4))
            small.load_state_dict({n: p[:m] if n in LATENT_PARAMETERS else p
                                   for n, p in sae.state_dict().items() if n in small.state_dict()})
            own = out.latent_indices < m  # its latents' codes, the others' slots emptied
            x_hat = small._decode_sum(sparse_decode(out.latent_acts * own, out.latent_indices * own, small.W_dec), xs)
            small_fvu = (xs - x_hat).pow(2).sum() / (xs - xs.mean(0)).pow(2).sum()
            torch.testing.assert_close(out.metrics[f"fvu_prefix_{m}"], small_fvu, rtol=1e-5, atol=1e-6)
        assert float(out.metrics["fvu_prefix_32"]) > float(out.metrics["fvu_prefix_64"])


def test_matryoshka_prefixes_are_checked():
    with pytest.raises(ValueError, match="matryoshka_prefixes must be increasing"):
        SAEConfig(d_in=16, latents=64, architecture="matryoshka_topk", matryoshka_prefixes=[16, 8])
    with pytest.raises(ValueError, match="matryoshka_prefixes must be increasing"):
        SAEConfig(d_in=16, latents=64, architecture="matryoshka_topk", matryoshka_prefixes=[16, 128])
    with pytest.raises(ValueError, match="matryoshka architectures only"):
        SAEConfig(d_in=16, latents=64, architecture="topk", matryoshka_prefixes=3)
    assert SAEConfig(d_in=16, latents=64, architecture="matryoshka_batchtopk").prefix_ends == (8, 16, 32, 64)


def transcoder_data(n=2048, seed=0):
    """x: sparse sums of directions; y: a fixed linear map of x plus a sparse nonlinear part (ReLU of a few
    features), so a skip path explains the linear share and the latents the rest."""
    g = torch.Generator().manual_seed(seed + 100)
    x = sparse_data(n=n, seed=seed)
    linear = torch.randn(16, 16, generator=g) / 4
    y = x @ linear.T + torch.relu(x @ torch.randn(16, 16, generator=g)) @ unit_rows(torch.randn(16, 16, generator=g))
    return x, y


def make_transcoder(arch, skip, target_size=1.0, **kw):
    x, y = transcoder_data()
    y = y * target_size
    sae = SparseAutoencoder(SAEConfig(d_in=16, latents=64, k=4, architecture=arch, transcoder=True, skip=skip, **kw))
    info = sae.initialize_transcoder(x[:1024], y[:1024], torch.Generator().manual_seed(0))
    return sae, x, y, info


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu"])
def test_skip_transcoder_matches_dense_reference_values_and_gradients(arch):
    """ŷ = codes of x (no b_dec subtraction) · unit decoder rows + b_dec + W_skip x; FVU against y; every
    gradient (W_skip's too) against dense products."""
    sae, x, y, _ = make_transcoder(arch, skip=True)
    with torch.no_grad():
        sae.W_skip.copy_(0.1 * torch.randn(16, 16, generator=torch.Generator().manual_seed(5)))
    xs, ys = x[:64], y[:64]
    out = sae(xs, target=ys)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    pre = xs @ sae.W_enc.T + sae.b_enc
    s = sae.target_scale  # the target is learned as s·y; the prediction comes back divided by s
    assert float(s) != 1.0
    if arch == "relu":
        codes = torch.relu(pre)
        y_hat = (codes @ sae.W_dec + sae.b_dec + xs @ sae.W_skip.T) / s
    else:
        selected = torch.zeros(64, 64).scatter(1, out.latent_indices, out.latent_acts.detach()) != 0
        codes = torch.where(selected, torch.relu(pre), torch.zeros_like(pre))
        y_hat = (codes @ unit_rows(sae.W_dec) + sae.b_dec + xs @ sae.W_skip.T) / s
    fvu = (ys - y_hat).pow(2).sum() / (ys - ys.mean(0)).pow(2).sum()
    loss = fvu
    if arch == "relu":
        rms = ((ys - ys.mean(0)).pow(2).sum() / 64).sqrt() * s
        loss = fvu + out.sparsity_coefficient * (codes * sae.W_dec.norm(dim=1)).sum(1).mean() / rms
    loss.backward()
    torch.testing.assert_close(out.x_hat.detach(), y_hat.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.fvu.detach(), fvu.detach(), rtol=1e-5, atol=1e-6)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("target_size", [1.0, 1e-3])
def test_transcoder_learns_and_the_skip_path_helps(target_size):
    """Also with a target 1,000 times smaller than the input (an MLP output next to its normalised input):
    the target is learned in the input's scale, so Adam's steps fit it (unscaled: FVU 1.5e5 in a job)."""
    results = {}
    for skip in (False, True):
        sae, x, y, info = make_transcoder("topk", skip, target_size=target_size)
        assert info["encoder_scale"] > 0
        if target_size != 1.0:  # s = RMS(x) / RMS(y): 1,000 times the unscaled target's
            unscaled = make_transcoder("topk", skip)[3]["target_scale"]
            assert info["target_scale"] == pytest.approx(1000 * unscaled, rel=1e-4)
        opt = torch.optim.Adam(sae.parameters(), lr=5e-3)
        start = float(sae(x, target=y).fvu.detach())
        for step in range(100):
            batch = slice((step * 256) % 2048, (step * 256) % 2048 + 256)
            out = sae(x[batch], target=y[batch])
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        with torch.no_grad():
            results[skip] = float(sae.eval()(x, target=y).fvu)
        assert results[skip] < 0.75 * start, (skip, start, results[skip])
    assert results[True] < results[False], results
