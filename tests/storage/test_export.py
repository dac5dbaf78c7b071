"""The exports: a trained TopK dictionary written by storage/export.py loads in EleutherAI's sparsify
and computes the same reconstruction; the newer kinds load in SAELens as their own architectures."""

import pytest
import torch

from storage.export import saelens_config, save_saelens, save_sparsify
from trainers.sae import SAEConfig, SparseAutoencoder


def test_sparsify_export_loads_and_reconstructs_the_same(tmp_path):
    sparsify = pytest.importorskip("sparsify")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g) * 2 + 0.3
    sae = SparseAutoencoder(SAEConfig(d_in=16, latents=64, k=4, initialization="random"))
    sae.initialize(x, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # a dictionary that is not at its initialization any more
        sae.W_enc.add_(0.2 * torch.randn(64, 16, generator=g))
        sae.b_enc.add_(0.05 * torch.randn(64, generator=g))
        ours = sae.eval()(x).x_hat
    uri = save_sparsify(str(tmp_path / "layers.1"), sae.export_tensors(), k=4, metadata={"job_id": "t"})
    coder = sparsify.SparseCoder.load_from_disk(uri)
    assert (coder.num_latents, coder.d_in, coder.cfg.k) == (64, 16, 4)
    with torch.no_grad():
        theirs = coder(x).sae_out
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["abstopk", "matryoshka_topk", "matryoshka_batchtopk"])
def test_saelens_export_of_the_newer_kinds_loads_and_reconstructs_the_same(tmp_path, arch):
    """saelens_config + save_saelens (the job's path): SAELens reads the architecture and computes our x̂."""
    sae_lens = pytest.importorskip("sae_lens")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g) * 2 + 0.3
    # BatchTopK kinds: no per-token cap below M, so that inference (codes above θ) is exactly JumpReLU's
    extra = {"batchtopk_row_cap": 64} if "batchtopk" in arch else {}
    sae = SparseAutoencoder(SAEConfig(d_in=16, latents=64, k=4, architecture=arch, initialization="random", **extra))
    sae.initialize(x, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.W_enc.add_(0.2 * torch.randn(64, 16, generator=g))
        sae.b_enc.add_(0.05 * torch.randn(64, generator=g))
        sae(x)  # one training forward: BatchTopK's θ
        out = sae.eval()(x)
    if "batchtopk" in arch:
        assert float(sae.threshold) > 0
    if arch.startswith("matryoshka_"):
        assert sae.export_config()["matryoshka_widths"] == [8, 16, 32, 64]
    if arch == "abstopk":
        assert bool((out.latent_acts < 0).any()), "no negative code: the export check would not see the sign"
    config = saelens_config(16, 64, sae.export_config(), {"hook_name": "blocks.1.hook_resid_post"})
    loaded = sae_lens.SAE.load_from_disk(save_saelens(str(tmp_path / arch), sae.export_tensors(), config))
    assert loaded.cfg.architecture() == sae.export_config()["architecture"]
    with torch.no_grad():
        theirs = loaded(x)
    torch.testing.assert_close(theirs, out.x_hat, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "relu"])
def test_input_normalization_is_folded_into_the_export_and_reconstructs_the_same(tmp_path, arch):
    """A dictionary trained on f·x (normalize_inputs): the SAELens export (and sparsify's, TopK) takes raw x and
    gives the same x̂ — f is folded into b_enc, b_dec and θ, cfg says normalize_activations none, as SAELens's
    own fold_activation_norm_scaling_factor leaves it."""
    sae_lens = pytest.importorskip("sae_lens")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g) * 50 + 7  # far from unit norm: f ≈ 1/200
    sae = SparseAutoencoder(SAEConfig(d_in=16, latents=64, k=4, architecture=arch, initialization="random",
                                      normalize_inputs=True))
    sae.initialize(x, generator=torch.Generator().manual_seed(1))
    assert float(sae.input_norm_factor) < 0.01
    with torch.no_grad():
        sae.W_enc.add_(0.2 * torch.randn(64, 16, generator=g))
        sae.b_enc.add_(0.05 * torch.randn(64, generator=g))
        out = sae.eval()(x)
    assert float((out.latent_acts != 0).float().sum(dim=-1).mean()) > 0.5, "no latent fires: nothing compared"
    config = saelens_config(16, 64, sae.export_config(), {"hook_name": "blocks.1.hook_attn_out"})
    loaded = sae_lens.SAE.load_from_disk(save_saelens(str(tmp_path / arch), sae.export_tensors(), config))
    with torch.no_grad():
        theirs = loaded(x)
    torch.testing.assert_close(theirs, out.x_hat, rtol=1e-4, atol=1e-3)
    if arch == "topk":
        sparsify = pytest.importorskip("sparsify")
        coder = sparsify.SparseCoder.load_from_disk(save_sparsify(str(tmp_path / "sp"), sae.export_tensors(), 4, {}))
        with torch.no_grad():
            torch.testing.assert_close(coder(x).sae_out, out.x_hat, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("arch,skip,kind", [("relu", False, "transcoder"), ("relu", True, "skip_transcoder"),
                                            ("batchtopk", False, "jumprelu_transcoder"),
                                            ("batchtopk", True, "jumprelu_skip_transcoder")])
def test_transcoder_exports_load_in_saelens_and_predict_the_same(tmp_path, arch, skip, kind):
    sae_lens = pytest.importorskip("sae_lens")
    sae, x, y = _trained_transcoder(arch, skip)
    with torch.no_grad():
        ours = sae.eval()(x, target=y).x_hat
    config = saelens_config(16, 64, sae.export_config(), {"hook_name": "blocks.1.ln2.hook_normalized",
                                                          "hook_name_out": "blocks.1.hook_mlp_out"})
    assert config["architecture"] == kind and config["apply_b_dec_to_input"] is False
    loaded = sae_lens.SAE.load_from_disk(save_saelens(str(tmp_path / kind), sae.export_tensors(), config))
    assert loaded.cfg.architecture() == kind and loaded.cfg.d_out == 16
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("skip", [False, True])
def test_topk_transcoder_exports_load_in_sparsify_and_predict_the_same(tmp_path, skip):
    sparsify = pytest.importorskip("sparsify")
    sae, x, y = _trained_transcoder("topk", skip)
    with torch.no_grad():
        ours = sae.eval()(x, target=y).x_hat
    with pytest.raises(ValueError, match="SAELens has no topk transcoder"):
        sae.export_config()
    uri = save_sparsify(str(tmp_path / "layers.1.mlp"), sae.export_tensors(), k=4, metadata={}, transcode=True)
    coder = sparsify.SparseCoder.load_from_disk(uri)
    assert coder.cfg.transcode and coder.cfg.skip_connection == skip
    with torch.no_grad():
        torch.testing.assert_close(coder(x, y).sae_out, ours, rtol=1e-4, atol=1e-4)


def _trained_transcoder(arch: str, skip: bool):
    """A transcoder whose weights are not at their initialization (W_skip nonzero, encoder perturbed)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 16, generator=g) * 2 + 0.3
    y = x @ torch.randn(16, 16, generator=g) / 4 + torch.relu(x @ torch.randn(16, 16, generator=g))
    extra = {"batchtopk_row_cap": 64} if arch == "batchtopk" else {}  # inference exactly JumpReLU's
    sae = SparseAutoencoder(SAEConfig(d_in=16, latents=64, k=4, architecture=arch, initialization="random",
                                      transcoder=True, skip=skip, **extra))
    sae.initialize_transcoder(x, y, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.W_enc.add_(0.2 * torch.randn(64, 16, generator=g))
        if skip:
            sae.W_skip.add_(0.1 * torch.randn(16, 16, generator=g))
        sae(x[:128], target=y[:128])  # a training forward: BatchTopK's θ (compared on other rows: no tie at θ)
    return sae, x[128:], y[128:]
