"""One rank of the checkpoint round trips in test_checkpoint.py, run as its own process:
python checkpoint_worker.py RANK WORLD SHARDS ZERO_STAGE PORT MODE CHECKPOINT_DIR OUT_FILE [KIND]

MODE "straight": train STEPS_BEFORE steps, checkpoint, train STEPS_AFTER more; "resume": load the checkpoint
(written with any layout) and train STEPS_AFTER steps. KIND: a key of KINDS (default topk). OUT_FILE gets the
full (gathered) state at the end: parameters, buffers and the firing counters."""

import os
import sys
from pathlib import Path

import torch

D, M, N, K = 16, 64, 48, 4
STEPS_BEFORE, STEPS_AFTER = 3, 3
# SAEConfig fields of each dictionary kind. Matryoshka: the prefix of 40 spans the boundary of two 32-latent
# shards. The transcoder predicts target(step) (another scale than its input, so target_scale is not 1).
KINDS = {
    "topk": {},
    "abstopk": {"architecture": "abstopk"},
    "matryoshka_batchtopk": {"architecture": "matryoshka_batchtopk", "matryoshka_prefixes": (16, 40)},
    "skip_transcoder": {"transcoder": True, "skip": True},
}


def batch(step: int) -> torch.Tensor:
    """The same batch on every rank: data-parallel replicas then average equal gradients, so any layout
    trains the same dictionary."""
    return torch.randn(N, D, generator=torch.Generator().manual_seed(100 + step)) * 2 + 0.5


def target(step: int) -> torch.Tensor:
    """A transcoder's target rows for batch(step): a fixed nonlinear map of them, at a tenth of their scale."""
    mix = torch.randn(D, D, generator=torch.Generator().manual_seed(7)) / D**0.5
    return torch.tanh(batch(step) @ mix) * 0.1


def train(engine, tracker, mesh, steps: range, transcoder: bool) -> list[float]:
    losses = []
    for step in steps:
        out = engine(batch(step), dead_mask=tracker.dead_mask(), progress=step / 10,
                     target=target(step) if transcoder else None)
        engine.backward(out.loss)
        engine.step()
        tracker.update_counts(tracker.batch_counts(out.latent_acts, out.latent_indices), N)
        losses.append(float(out.loss))
    return losses


if __name__ == "__main__":
    rank, world, shards, stage, port = (int(a) for a in sys.argv[1:6])
    mode, checkpoint, out_file = sys.argv[6], Path(sys.argv[7]), sys.argv[8]
    kind = sys.argv[9] if len(sys.argv) > 9 else "topk"
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import deepspeed

    from trainers import checkpoint as checkpoints
    from trainers.engine import build_engine
    from trainers.metrics import FiringTracker
    from trainers.parallel import ShardMesh
    from trainers.sae import LATENT_PARAMETERS, SAEConfig, SparseAutoencoder

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    mesh = ShardMesh.build(world, rank, shards)
    cfg = SAEConfig(d_in=D, latents=M, k=K, k_aux=8, initialization="random", **KINDS[kind])
    sae = SparseAutoencoder(cfg, mesh=mesh)
    # As trainers/worker.py does, a resume initializes from the batch it resumes at and the checkpoint overwrites
    # what that sets (a transcoder's target_scale, from its sample, among it).
    first = 0 if mode == "straight" else STEPS_BEFORE
    if cfg.transcoder:
        sae.initialize_transcoder(batch(first), target(first), generator=torch.Generator().manual_seed(1))
    else:
        sae.initialize(batch(first), generator=torch.Generator().manual_seed(1))
    engine = build_engine(sae, lr=3e-3, total_steps=10, warmup_steps=2, zero_stage=stage, bf16=False,
                          mpu=mesh if world > 1 else None)
    tracker = FiringTracker(sae.latent_stop - sae.latent_start, window_tokens=2 * N)
    losses = []
    if mode == "straight":
        losses += train(engine, tracker, mesh, range(STEPS_BEFORE), cfg.transcoder)
        checkpoints.save(checkpoint, engine, mesh, tracker)
    else:
        assert checkpoints.load(checkpoint, engine, mesh, tracker) == STEPS_BEFORE
    losses += train(engine, tracker, mesh, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER), cfg.transcoder)
    state = {name: (mesh.gather_latents(p.detach()) if name in LATENT_PARAMETERS else p.detach()).clone()
             for name, p in engine.module.named_parameters()}
    state.update({name: b.detach().clone() for name, b in engine.module.named_buffers()})  # θ, target_scale
    state["tokens_since_fired"] = mesh.gather_latents(tracker.tokens_since_fired)
    if rank == 0:
        torch.save({"losses": losses, "state": state, "lr": engine.get_lr()[0]}, out_file)
    torch.distributed.barrier()
