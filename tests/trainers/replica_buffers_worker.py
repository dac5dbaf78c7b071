"""One data-parallel replica of test_replica_buffers.py, run as its own process (gloo):
python replica_buffers_worker.py RANK WORLD PORT OUT_FILE

Each replica initializes from and trains on its own batches (as the job's replicas do); OUT_FILE gets the
non-parameter buffers (BatchTopK's θ, JumpReLU's input scale) and the batches' means."""

import os
import sys

import torch
import torch.distributed as dist

from trainers.parallel import ShardMesh
from trainers.sae import SAEConfig, SparseAutoencoder


def batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(64, 16, generator=torch.Generator().manual_seed(10 * rank + step)) * (1 + rank) + rank


if __name__ == "__main__":
    rank, world, port = (int(a) for a in sys.argv[1:4])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = ShardMesh.build(world, rank, 1)  # one shard: every rank is a replica
    out = {"batch_mean": float(batch(rank, 0).mean())}
    for arch in ("batchtopk", "jumprelu"):
        sae = SparseAutoencoder(SAEConfig(d_in=16, latents=32, k=4, architecture=arch), mesh=mesh)
        sae.initialize(batch(rank, 0), torch.Generator().manual_seed(0))
        for step in range(1, 4):
            sae(batch(rank, step), progress=step / 4)
        out[arch] = {name: buffer.clone() for name, buffer in sae.named_buffers()}
    torch.save(out, sys.argv[4])
    dist.destroy_process_group()
