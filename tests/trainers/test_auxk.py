"""AuxK (Gao et al. 2024, with the per-token least-squares scale of trainers/sae.py): the loss and its gradients
against a dense reference; a few AuxK-only steps lower it and turn the dead latents' decoder rows toward the
residual; and on a synthetic problem where latents die, AuxK ends with fewer dead latents than no AuxK — on one
rank and on two latent shards."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainers.sae import SAEConfig, SparseAutoencoder, unit_rows

WORKER = Path(__file__).with_name("auxk_worker.py")
_spec = importlib.util.spec_from_file_location("auxk_worker", WORKER)
auxk_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(auxk_worker)

D, M, N, K, K_AUX = 32, 256, 128, 4, 16


def dense_auxk(sae: SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The AuxK loss written out densely: the top-k_aux ReLU'd pre-activations among dead latents decode the
    (detached) residual of the main TopK reconstruction, each token's decode scaled by its least-squares fit
    in [0, 1] (no gradient through the fit), normalized by the residual's variance."""
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    acts, indices = torch.relu(pre).topk(sae.cfg.k, dim=1)
    directions = unit_rows(sae.W_dec)
    x_hat = torch.zeros_like(pre).scatter(1, indices, acts) @ directions + sae.b_dec
    residual = (x - x_hat).detach()
    dead_pre = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
    aux_acts, aux_indices = torch.relu(dead_pre).topk(min(sae.cfg.effective_k_aux, int(dead.sum())), dim=1)
    aux_codes = torch.zeros_like(pre).scatter(1, aux_indices, aux_acts)
    residual_hat = aux_codes @ directions
    with torch.no_grad():
        fit = (residual * residual_hat).sum(1, keepdim=True) / residual_hat.pow(2).sum(1, keepdim=True)
        fit = fit.nan_to_num(0.0).clamp(0.0, 1.0)
    loss = (residual - fit * residual_hat).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
    return loss, {"residual": residual, "aux_codes": aux_codes.detach()}


def constructed_case(seed: int = 0) -> tuple[SparseAutoencoder, torch.Tensor, torch.Tensor]:
    """A dictionary with a fixed dead set (every third latent) and data that its live latents leave a residual on."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=generator) @ torch.randn(D, D, generator=generator) * 0.3 + 0.5
    cfg = SAEConfig(d_in=D, latents=M, k=K, k_aux=K_AUX, initialization="random", encoder_chunk=96)
    sae = SparseAutoencoder(cfg)
    sae.initialize(x, generator=torch.Generator().manual_seed(seed + 1))
    dead = torch.zeros(M, dtype=torch.bool)
    dead[::3] = True
    return sae, x, dead


def residual_alignment(sae: SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor) -> float:
    """Mean over the dead latents that AuxK uses of cos(decoder row, the residual it is asked to explain), the
    residual weighted by the latent's AuxK activation on each token."""
    _, parts = dense_auxk(sae, x, dead)
    target = parts["aux_codes"].T @ parts["residual"]  # [M, d]: Σ_n a_nj · e_n
    used = parts["aux_codes"].sum(0) > 0
    cosine = torch.nn.functional.cosine_similarity(unit_rows(sae.W_dec.detach())[used], target[used], dim=1)
    return float(cosine.mean())


def test_auxk_loss_and_gradients_match_the_dense_reference():
    sae, x, dead = constructed_case()
    out = sae(x, dead)
    out.auxk_loss.backward()
    got = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    reference, _ = dense_auxk(sae, x, dead)
    reference.backward()
    torch.testing.assert_close(out.auxk_loss.detach(), reference.detach(), rtol=1e-5, atol=1e-6)
    assert float(reference.detach()) > 0
    for name, p in sae.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=f"AuxK gradient of {name}")


def test_auxk_steps_lower_its_loss_and_turn_dead_rows_toward_the_residual():
    sae, x, dead = constructed_case()
    before_loss, before_alignment = float(dense_auxk(sae, x, dead)[0]), residual_alignment(sae, x, dead)
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for _ in range(10):
        out = sae(x, dead)
        optimizer.zero_grad()
        out.auxk_loss.backward()
        optimizer.step()
    after_loss, after_alignment = float(dense_auxk(sae, x, dead)[0]), residual_alignment(sae, x, dead)
    assert after_loss < before_loss - 0.05, (before_loss, after_loss)
    assert after_alignment > before_alignment + 0.05, (before_alignment, after_alignment)


@pytest.mark.slow
def test_auxk_ends_with_fewer_dead_latents_than_no_auxk():
    off = auxk_worker.train(0.0)
    on = auxk_worker.train(1 / 32)
    assert off["dead_fraction"] > 0.05, "the problem must lose latents without AuxK for the comparison to mean much"
    assert on["dead_fraction"] < 0.75 * off["dead_fraction"], (on["dead_fraction"], off["dead_fraction"])
    assert on["fvu"] <= off["fvu"] * 1.01, (on["fvu"], off["fvu"])


@pytest.mark.slow
def test_auxk_on_two_latent_shards_ends_with_fewer_dead_latents(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    ranks = [subprocess.Popen([sys.executable, str(WORKER), str(rank), "2", init, str(tmp_path / f"rank{rank}.pt")])
             for rank in range(2)]
    for process in ranks:
        assert process.wait(timeout=600) == 0, "a sharded rank failed"
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert results[0]["auxk"]["dead_fraction"] == results[1]["auxk"]["dead_fraction"]  # summed over shards
    sharded_on, sharded_off = results[0]["auxk"]["dead_fraction"], results[0]["off"]["dead_fraction"]
    assert sharded_on < 0.75 * sharded_off, (sharded_on, sharded_off)
    assert max(results[0]["auxk"]["auxk_losses"]) > 0, "AuxK never engaged on the sharded path"
