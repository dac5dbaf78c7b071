"""One rank of the gradient-clipping checks in test_clip.py, run as its own process:
python clip_worker.py RANK WORLD PORT OUT_FILE

WORLD ranks are WORLD latent shards of one dictionary, trained through real DeepSpeed engines built by
trainers.engine.build_engine with a clip norm far below the gradients' norm, so every step is clipped: once with
the touched-row lazy Adam (which clips itself) and once with dense Adam (DeepSpeed's gradient_clipping)."""

import os
import sys

import torch

D, M, N, K, STEPS, LR, CLIP = 16, 64, 40, 4, 4, 1e-2, 1e-3


def batch(step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(N, D, generator=generator) * (1 + step) + 0.5  # norms that change from step to step


def train(mesh, sparse_grads: bool) -> dict:
    from trainers.engine import build_engine
    from trainers.sae import SAEConfig, SparseAutoencoder

    cfg = SAEConfig(d_in=D, latents=M, k=K, architecture="topk", initialization="random", auxk_alpha=0.0,
                    sparse_grads=sparse_grads)
    sae = SparseAutoencoder(cfg, mesh=mesh)
    sae.initialize(batch(0), generator=torch.Generator().manual_seed(1))
    engine = build_engine(sae, lr=LR, total_steps=STEPS, warmup_steps=0, zero_stage=0, bf16=False,
                          mpu=mesh if mesh.world > 1 else None, grad_clip_norm=CLIP)
    norms = []
    for step in range(STEPS):
        out = engine(batch(step))
        engine.backward(out.loss)
        engine.step()
        norms.append(getattr(engine.optimizer, "_global_grad_norm", None))
    return {"params": {name: p.detach().clone() for name, p in sae.named_parameters()}, "norms": norms,
            "range": (sae.latent_start, sae.latent_stop), "optimizer": type(engine.optimizer).__name__}


if __name__ == "__main__":
    rank, world, port, out_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port)
    import deepspeed

    from trainers.parallel import ShardMesh

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    mesh = ShardMesh.build(world, rank, shards=world)
    torch.save({"lazy_adam": train(mesh, sparse_grads=True), "adam": train(mesh, sparse_grads=False)}, out_file)
    torch.distributed.barrier()
