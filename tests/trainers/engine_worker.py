"""The DeepSpeed options of test_engine.py, run as one process (DeepSpeed's process group stays out of pytest):
python engine_worker.py PORT CHECKPOINT_DIR OUT_FILE.

Every configuration trains the same dictionary on the same batches for OPTIMIZER_STEPS steps of
ACCUMULATION micro-batches each; the reference is a plain torch loop that averages the micro-batch losses."""

import os
import sys
from pathlib import Path

import torch

D, M, N, K = 16, 64, 48, 4
ACCUMULATION, OPTIMIZER_STEPS, LR = 2, 4, 3e-3
# (ZeRO stage, optimizer offload to CPU, gradient accumulation steps)
CONFIGURATIONS = [(0, False, ACCUMULATION), (1, False, ACCUMULATION), (1, True, ACCUMULATION), (2, True, 1)]


def batch(index: int) -> torch.Tensor:
    return torch.randn(N, D, generator=torch.Generator().manual_seed(100 + index)) * 2 + 0.5


def dictionary():
    from trainers.sae import SAEConfig, SparseAutoencoder

    sae = SparseAutoencoder(SAEConfig(d_in=D, latents=M, k=K, k_aux=8, initialization="random"))
    sae.initialize(batch(0), generator=torch.Generator().manual_seed(1))
    return sae


def reference(accumulation: int) -> dict[str, torch.Tensor]:
    from trainers.engine import ADAM_BETAS, ADAM_EPS, lr_lambda

    sae = dictionary()
    optimizer = torch.optim.Adam(sae.parameters(), lr=LR, betas=ADAM_BETAS, eps=ADAM_EPS)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(OPTIMIZER_STEPS, 1))
    for step in range(OPTIMIZER_STEPS):
        for micro in range(accumulation):
            (sae(batch(step * accumulation + micro)).loss / accumulation).backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    return {name: p.detach().clone() for name, p in sae.named_parameters()}


def engine(stage: int, offload: bool, accumulation: int):
    from trainers.engine import build_engine

    return build_engine(dictionary(), lr=LR, total_steps=OPTIMIZER_STEPS, warmup_steps=1, zero_stage=stage,
                        bf16=False, gradient_accumulation_steps=accumulation, offload_optimizer=offload)


def train(engine, micro_batches: range) -> None:
    for index in micro_batches:
        engine.backward(engine(batch(index)).loss)
        engine.step()


def state(engine) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in engine.module.named_parameters()}


if __name__ == "__main__":
    port, checkpoint, out_file = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    import deepspeed

    from trainers import checkpoint as checkpoints
    from trainers.metrics import FiringTracker
    from trainers.parallel import ShardMesh

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    results = {"reference": {g: reference(g) for g in {g for _, _, g in CONFIGURATIONS}}}
    for stage, offload, accumulation in CONFIGURATIONS:
        trained = engine(stage, offload, accumulation)
        train(trained, range(OPTIMIZER_STEPS * accumulation))
        results[(stage, offload, accumulation)] = state(trained)
    # Offloaded optimizer state through a checkpoint: stop after two optimizer steps, resume in a new engine.
    mesh, half = ShardMesh.build(1, 0, 1), OPTIMIZER_STEPS // 2 * ACCUMULATION
    first = engine(1, True, ACCUMULATION)
    train(first, range(half))
    checkpoints.save(checkpoint, first, mesh, FiringTracker(M, window_tokens=10 * N))
    resumed = engine(1, True, ACCUMULATION)
    results["resumed_at"] = checkpoints.load(checkpoint, resumed, mesh, FiringTracker(M, window_tokens=10 * N))
    train(resumed, range(half, OPTIMIZER_STEPS * ACCUMULATION))
    results["resumed"] = state(resumed)
    torch.save(results, out_file)
