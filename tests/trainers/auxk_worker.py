"""A synthetic dictionary-learning problem where latents die, trained with AuxK on or off, on one rank or as one
latent shard of several (run as its own process: python auxk_worker.py RANK WORLD INIT_URL OUT_FILE).

Ground truth: FEATURES unit directions in a SUBSPACE-dimensional subspace of R^D (as attention outputs occupy
a low-dimensional subspace), each token a sum of ACTIVE of them with random magnitudes, plus an offset. A
TopK dictionary with random decoder rows in all of R^D loses latents quickly (a window of 4 batches).
"""

import math
import sys

import torch
import torch.distributed as dist

from trainers.metrics import FiringTracker
from trainers.parallel import ShardMesh
from trainers.sae import SAEConfig, SparseAutoencoder

D, FEATURES, SUBSPACE, ACTIVE, BATCH = 64, 256, 32, 4, 512
LATENTS, STEPS, WINDOW_BATCHES = 512, 200, 4


def ground_truth(seed: int = 1) -> tuple[torch.Tensor, torch.Generator]:
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, SUBSPACE, generator=generator))[0]
    features = torch.randn(FEATURES, SUBSPACE, generator=generator) @ basis.T
    return features / features.norm(dim=1, keepdim=True), generator


def batch(features: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    which = torch.randint(FEATURES, (BATCH, ACTIVE), generator=generator)
    magnitudes = torch.rand(BATCH, ACTIVE, generator=generator) * 2 + 0.5
    return torch.zeros(BATCH, FEATURES).scatter_add_(1, which, magnitudes) @ features + 0.3


def train(auxk_alpha: float, mesh: ShardMesh | None = None, fit_scale: bool = True) -> dict:
    """Dead fraction (no firing in the last WINDOW_BATCHES batches) and FVU after STEPS Adam steps."""
    features, generator = ground_truth()
    cfg = SAEConfig(d_in=D, latents=LATENTS, k=ACTIVE, initialization="random", auxk_alpha=auxk_alpha,
                    auxk_fit_scale=fit_scale)
    torch.manual_seed(0)
    sae = SparseAutoencoder(cfg, mesh=mesh)
    sae.initialize(batch(features, generator), torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4 / math.sqrt(LATENTS / 2**14), eps=6.25e-10)
    tracker = FiringTracker(sae.latent_stop - sae.latent_start, window_tokens=WINDOW_BATCHES * BATCH)
    auxk_losses = []
    for _ in range(STEPS):
        out = sae(batch(features, generator), tracker.dead_mask())
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        tracker.update(out.latent_acts.detach(), out.latent_indices)
        auxk_losses.append(float(out.auxk_loss.detach()))
    dead = tracker.dead_mask().sum().reshape(1).float()
    if mesh is not None:
        mesh.sum_over(dead, "shards")
    return {"dead_fraction": float(dead) / LATENTS, "fvu": float(out.fvu.detach()), "auxk_losses": auxk_losses}


if __name__ == "__main__":
    rank, world, init, out_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    mesh = ShardMesh.build(world, rank, shards=world)
    torch.save({"auxk": train(1 / 32, mesh), "off": train(0.0, mesh)}, out_file)
    dist.barrier()
    dist.destroy_process_group()
