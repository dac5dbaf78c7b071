"""One rank of the two-rank sharding comparison in test_parallel.py, run as its own process:
python sharded_worker.py RANK WORLD INIT_URL OUT_FILE."""

import sys

import torch
import torch.distributed as dist

from trainers.parallel import ShardMesh
from trainers.sae import SAEConfig, SparseAutoencoder

D, M, N, K = 16, 64, 40, 4
# case -> (architecture, dead latents). The last case has dead latents on shard 0 only, fewer than k_aux: the
# shards then disagree on how many AuxK candidates they have, and shard 1 on whether there are any.
CASES = {"topk": ("topk", slice(None, None, 3)), "batchtopk": ("batchtopk", slice(None, None, 3)),
         "abstopk": ("abstopk", slice(None, None, 3)),
         "matryoshka_topk": ("matryoshka_topk", slice(None, None, 3)),
         "matryoshka_batchtopk": ("matryoshka_batchtopk", slice(None, None, 3)),
         "skip-transcoder": ("topk", slice(None, None, 3)),
         "matryoshka-skip-transcoder": ("matryoshka_batchtopk", slice(None, None, 3)),
         "relu": ("relu", slice(None, None, 3)), "jumprelu": ("jumprelu", slice(None, None, 3)),
         "topk-dead-on-one-shard": ("topk", slice(0, 5))}


# Matryoshka prefixes 8, 24, 40, 64 of 64: with two shards of 32 the group [24, 40) spans the boundary.
EXTRA = {"matryoshka_topk": {"matryoshka_prefixes": [8, 24, 40]},
         "matryoshka_batchtopk": {"matryoshka_prefixes": [8, 24, 40]},
         "skip-transcoder": {"transcoder": True, "skip": True},
         "matryoshka-skip-transcoder": {"transcoder": True, "skip": True, "matryoshka_prefixes": [8, 24, 40]}}


def data(dead_latents: slice):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=generator) * 2 + 0.5
    dead = torch.zeros(M, dtype=torch.bool)
    dead[dead_latents] = True
    y = x @ torch.randn(D, D, generator=generator) / 4 + torch.relu(x @ torch.randn(D, D, generator=generator))
    return x, y, dead


def run(case: str, mesh: ShardMesh | None) -> dict:
    architecture, dead_latents = CASES[case]
    x, y, dead = data(dead_latents)
    transcoder = EXTRA.get(case, {}).get("transcoder", False)
    cfg = SAEConfig(d_in=D, latents=M, k=K, architecture=architecture, k_aux=8, initialization="random",
                    sparsity_warmup=0.0, **EXTRA.get(case, {}))
    sae = SparseAutoencoder(cfg, mesh=mesh)
    if transcoder:
        sae.initialize_transcoder(x, y, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():  # a skip path that is not zero any more
            sae.W_skip.copy_(0.1 * torch.randn(D, D, generator=torch.Generator().manual_seed(3)))
    else:
        sae.initialize(x, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # a trained-looking encoder: not exactly the decoder's transpose
        sae.W_enc.add_(0.3 * torch.randn(M, D, generator=torch.Generator().manual_seed(2))[
            sae.latent_start:sae.latent_stop])
    out = sae(x, dead_mask=dead[sae.latent_start:sae.latent_stop], target=y if transcoder else None)
    out.loss.backward()
    return {"loss": out.loss.detach(), "fvu": out.fvu.detach(), "auxk": out.auxk_loss.detach(),
            "x_hat": out.x_hat.detach(), "metrics": {name: value.detach() for name, value in out.metrics.items()},
            "grads": {n: p.grad.clone() for n, p in sae.named_parameters()},
            "range": (sae.latent_start, sae.latent_stop)}


if __name__ == "__main__":
    rank, world, init, out_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    mesh = ShardMesh.build(world, rank, shards=world)
    torch.save({case: run(case, mesh) for case in CASES}, out_file)
    dist.barrier()
    dist.destroy_process_group()
