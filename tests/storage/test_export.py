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
