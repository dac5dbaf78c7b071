"""One rank of the touched-row optimizer checks in test_lazy_adam.py, run as its own process:
python lazy_adam_worker.py RANK WORLD PORT CHECKPOINT_DIR OUT_FILE

Every rank trains dictionaries through real DeepSpeed engines built by trainers.engine.build_engine with
row-sparse gradients (RowSparseAdam as the client optimizer) and records, after every optimizer step, its
parameters and a reference's. The references train the same dictionary with dense gradients on the mean of
every replica's batch: torch.optim.Adam when every row is touched on every step (k = latents), and a reference
lazy Adam written out here (Adam on the rows some replica gave a nonzero code, bias correction by the global step)
when rows are touched intermittently. On one rank the worker also checkpoints mid-training and resumes."""

import os
import sys
from pathlib import Path

import torch

D, N, STEPS, LR, WARMUP = 16, 24, 6, 3e-3, 2
CASES = {"every-row": ("topk", 16, 16), "topk": ("topk", 64, 3), "batchtopk": ("batchtopk", 64, 3)}


def batch(step: int, replica: int) -> torch.Tensor:
    return torch.randn(N, D, generator=torch.Generator().manual_seed(1000 * replica + step)) * 2 + 0.5


def dictionary(case: str, sparse_grads: bool):
    from trainers.sae import SAEConfig, SparseAutoencoder

    architecture, latents, k = CASES[case]
    cfg = SAEConfig(d_in=D, latents=latents, k=k, architecture=architecture, initialization="random",
                    auxk_alpha=0.0, sparse_grads=sparse_grads)
    sae = SparseAutoencoder(cfg)
    sae.initialize(batch(0, 0), generator=torch.Generator().manual_seed(1))
    return sae


def reference(case: str, replicas: int) -> tuple[list[dict], list[torch.Tensor]]:
    """Parameters after each step, and the rows touched at each step, of the dense-gradient reference."""
    from trainers.engine import ADAM_BETAS, ADAM_EPS, lr_lambda

    sae = dictionary(case, sparse_grads=False)
    schedule = lr_lambda(STEPS, WARMUP)
    beta1, beta2 = ADAM_BETAS
    adam = torch.optim.Adam(sae.parameters(), lr=LR, betas=ADAM_BETAS, eps=ADAM_EPS)
    moments = {name: (torch.zeros_like(p), torch.zeros_like(p)) for name, p in sae.named_parameters()}
    states, touched_rows = [], []
    for step in range(STEPS):
        touched = torch.zeros(sae.cfg.latents, dtype=torch.bool)
        for replica in range(replicas):
            out = sae(batch(step, replica))
            (out.loss / replicas).backward()
            touched[out.latent_indices[out.latent_acts != 0]] = True  # a zero code touches nothing
        touched_rows.append(touched)
        lr = LR * schedule(step)
        if case == "every-row":
            for group in adam.param_groups:
                group["lr"] = lr
            adam.step()
        else:
            with torch.no_grad():
                t = step + 1
                for name, p in sae.named_parameters():
                    rows = touched if name in ("W_enc", "W_dec") else slice(None)
                    m, v = moments[name]
                    m[rows] = m[rows] * beta1 + (1 - beta1) * p.grad[rows]
                    v[rows] = v[rows] * beta2 + (1 - beta2) * p.grad[rows] ** 2
                    denominator = (v[rows] / (1 - beta2**t)).sqrt() + ADAM_EPS
                    p[rows] -= lr / (1 - beta1**t) * m[rows] / denominator
        sae.zero_grad(set_to_none=True)
        states.append({name: p.detach().clone() for name, p in sae.named_parameters()})
    return states, touched_rows


def engine(case: str, mesh):
    from trainers.engine import build_engine

    return build_engine(dictionary(case, sparse_grads=True), lr=LR, total_steps=STEPS, warmup_steps=WARMUP,
                        zero_stage=0, bf16=False, mpu=mesh if mesh.world > 1 else None)


def train(trained, mesh, steps: range) -> tuple[list[dict], list[float]]:
    """Parameters and learning rate after each step."""
    states, lrs = [], []
    for step in steps:
        out = trained(batch(step, mesh.replica))
        trained.backward(out.loss)
        grad = trained.module.W_enc.grad
        assert grad is not None and grad.is_sparse, "W_enc's gradient is not row-sparse"
        trained.step()
        states.append({name: p.detach().clone() for name, p in trained.module.named_parameters()})
        lrs.append(trained.get_lr()[0])
    return states, lrs


if __name__ == "__main__":
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    checkpoint, out_file = Path(sys.argv[4]), sys.argv[5]
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port)
    import deepspeed

    from trainers import checkpoint as checkpoints
    from trainers.metrics import FiringTracker
    from trainers.parallel import ShardMesh

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    mesh = ShardMesh.build(world, rank, shards=1)
    results = {}
    for case in CASES:
        trained = engine(case, mesh)
        states, lrs = train(trained, mesh, range(STEPS))
        results[case] = {"engine": states, "lrs": lrs}
        results[case]["reference"], results[case]["touched"] = reference(case, world)
    if world == 1:  # checkpoint after half the steps, resume in a new engine
        half, latents = STEPS // 2, CASES["topk"][1]
        first = engine("topk", mesh)
        train(first, mesh, range(half))
        checkpoints.save(checkpoint, first, mesh, FiringTracker(latents, window_tokens=10 * N))
        resumed = engine("topk", mesh)
        results["resumed_at"] = checkpoints.load(checkpoint, resumed, mesh, FiringTracker(latents, 10 * N))
        results["resumed"], results["resumed_lrs"] = train(resumed, mesh, range(half, STEPS))
    torch.save(results, out_file)
    torch.distributed.barrier()
